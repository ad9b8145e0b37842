//! Service types: their port ranges and the command-line patterns that identify them.
//!
//! Built-in defaults are those the earlier Node.js Styxy shipped, so its users find the same ports; a TOML
//! config can change a range, add patterns or add new types. Parsing takes a string, not a file: no I/O here.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The type every unknown service falls back to.
pub const FALLBACK_TYPE: &str = "dev";

/// How many ports above a requested port a move may search when that port is in no service's range.
pub const ADHOC_WINDOW: u16 = 100;

/// One service type: a name, an inclusive port range and the words that identify it in a command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceType {
    /// The type's name (`storybook`, `api`, …).
    pub name: String,
    /// First port of its range.
    pub start: u16,
    /// Last port of its range.
    pub end: u16,
    /// Words of a command line that mark a server of this type.
    pub patterns: Vec<String>,
}

impl ServiceType {
    /// Whether `port` is in this type's range.
    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }
}

/// An inclusive port range a search walks, with the service type it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRange {
    /// The service type the range belongs to (the fallback's name outside every range).
    pub service_type: String,
    /// First port.
    pub start: u16,
    /// Last port.
    pub end: u16,
}

/// A service type nobody configured, asked for by name (`Allocate`, `Suggest`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown service type {name:?}{}; known types: {}",
    nearest.as_ref().map(|n| format!(" (did you mean {n:?}?)")).unwrap_or_default(),
    known.join(", ")
)]
pub struct UnknownServiceType {
    /// The name asked for.
    pub name: String,
    /// The known name nearest to it, when one is a typo away (at most two edits).
    pub nearest: Option<String>,
    /// Every known name, sorted.
    pub known: Vec<String>,
}

/// Levenshtein distance between two short names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// Why a config was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("config is not valid TOML: {0}")]
    /// The file is not valid TOML, or has unknown keys.
    Toml(String),
    #[error("service type name {0:?} is invalid: use 1-64 of a-z, 0-9, '_', '.', '-'")]
    /// A service type name outside `[a-z0-9_.-]{1,64}`.
    BadName(String),
    #[error("service type {name:?}: range [{start}, {end}] is invalid: ports are 1-65535 and start <= end")]
    /// A range that is empty, reversed, or outside 1-65535.
    BadRange {
        /// The service type.
        name: String,
        /// Its first port, as written.
        start: u32,
        /// Its last port, as written.
        end: u32,
    },
    #[error(
        "service type {0:?} has no range and is not a built-in type: add `range = [START, END]`"
    )]
    /// A service type with no `range` and no built-in range to keep.
    MissingRange(String),
}

/// Every known service type, in matching order (config-defined first, then built-ins).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRanges {
    types: Vec<ServiceType>,
}

/// `(name, start, end, patterns)` of the built-in types, most specific first: the first match wins.
const BUILT_IN: &[(&str, u16, u16, &[&str])] = &[
    (
        "storybook",
        6006,
        6029,
        &["storybook", "start-storybook", "build-storybook"],
    ),
    (
        "docs",
        4100,
        4199,
        &[
            "mkdocs",
            "docusaurus",
            "sphinx-autobuild",
            "vitepress",
            "mdbook",
            "jekyll",
        ],
    ),
    (
        "test",
        9200,
        9299,
        &["playwright", "cypress", "vitest", "jest", "karma", "wdio"],
    ),
    (
        "ai",
        11400,
        11499,
        &[
            "ollama",
            "jupyter",
            "jupyter-lab",
            "jupyter-notebook",
            "vllm",
            "llama-server",
            "gradio",
            "comfyui",
        ],
    ),
    (
        "monitoring",
        3100,
        3199,
        &[
            "grafana",
            "grafana-server",
            "prometheus",
            "loki",
            "jaeger",
            "tempo",
        ],
    ),
    ("ui", 4000, 4099, &["emulator-ui", "streamlit"]),
    ("hub", 4400, 4499, &["emulator-hub"]),
    (
        "functions",
        5000,
        5099,
        &["functions-framework", "functions-emulator", "func"],
    ),
    (
        "database",
        5430,
        5499,
        &[
            "postgres",
            "pg_ctl",
            "mysqld",
            "mongod",
            "cockroach",
            "supabase",
        ],
    ),
    (
        "infrastructure",
        6370,
        6399,
        &["redis-server", "valkey-server", "keydb-server", "memcached"],
    ),
    (
        "api",
        8000,
        8099,
        &[
            "http.server",
            "uvicorn",
            "gunicorn",
            "hypercorn",
            "daphne",
            "flask",
            "fastapi",
            "runserver",
            "rails",
            "puma",
            "json-server",
        ],
    ),
    (
        "proxy",
        8100,
        8199,
        &["nginx", "caddy", "haproxy", "traefik", "envoy", "mitmproxy"],
    ),
    ("build", 8200, 8299, &["esbuild", "rollup"]),
    (
        "messaging",
        9050,
        9098,
        &[
            "kafka",
            "rabbitmq-server",
            "nats-server",
            "mosquitto",
            "pubsub-emulator",
        ],
    ),
    (
        "auth",
        9099,
        9199,
        &["keycloak", "auth-emulator", "oauth2-proxy", "dex"],
    ),
    ("coordination", 9870, 9899, &["zookeeper", "etcd", "consul"]),
    (
        "dev",
        3000,
        3099,
        &[
            "vite",
            "next",
            "nuxt",
            "webpack-dev-server",
            "react-scripts",
            "remix",
            "astro",
            "svelte-kit",
            "parcel",
            "nodemon",
            "ng",
        ],
    ),
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    services: BTreeMap<String, ServiceEntry>,
    #[serde(default)]
    limits: LimitsEntry,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitsEntry {
    leases_per_user: Option<usize>,
    range_share_percent: Option<u8>,
}

/// How much one user may lease (root and the shim's claims are not limited): the rest of every
/// range stays for others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserLimits {
    /// Live `Allocate` leases per user, over all ranges.
    pub leases_per_user: usize,
    /// The share of one service range one user may lease, in percent (at least one port).
    pub range_share_percent: u8,
}

impl Default for UserLimits {
    fn default() -> Self {
        UserLimits {
            leases_per_user: 64,
            range_share_percent: 50,
        }
    }
}

impl UserLimits {
    /// The `[limits]` of a config file (`leases_per_user`, `range_share_percent`); defaults for
    /// what it does not set.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let file: ConfigFile =
            toml::from_str(text).map_err(|e| ConfigError::Toml(e.to_string()))?;
        let defaults = UserLimits::default();
        let share = file
            .limits
            .range_share_percent
            .unwrap_or(defaults.range_share_percent);
        if !(1..=100).contains(&share) {
            return Err(ConfigError::Toml(format!(
                "[limits] range_share_percent must be from 1 to 100, got {share}"
            )));
        }
        Ok(UserLimits {
            leases_per_user: file
                .limits
                .leases_per_user
                .unwrap_or(defaults.leases_per_user),
            range_share_percent: share,
        })
    }

    /// How many ports of a range of `len` ports one user may lease.
    pub fn range_cap(&self, len: usize) -> usize {
        (len * usize::from(self.range_share_percent) / 100).max(1)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceEntry {
    range: Option<[u32; 2]>,
    #[serde(default)]
    patterns: Vec<String>,
}

/// Whether `name` is a valid service type name: `[a-z0-9_.-]{1,64}`.
pub fn is_valid_type_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        })
}

impl Default for ServiceRanges {
    fn default() -> Self {
        let types = BUILT_IN
            .iter()
            .map(|(name, start, end, patterns)| ServiceType {
                name: (*name).to_string(),
                start: *start,
                end: *end,
                patterns: patterns.iter().map(|p| (*p).to_string()).collect(),
            })
            .collect();
        ServiceRanges { types }
    }
}

impl ServiceRanges {
    /// The built-in types, changed and extended by a TOML config such as:
    ///
    /// ```toml
    /// [services.storybook]
    /// range = [7000, 7019]          # replaces the built-in range
    /// patterns = ["my-storybook"]   # added to the built-in patterns
    ///
    /// [services.grpc]               # a new type, matched before the built-ins
    /// range = [9400, 9449]
    /// patterns = ["grpc-server"]
    /// ```
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let file: ConfigFile =
            toml::from_str(text).map_err(|e| ConfigError::Toml(e.to_string()))?;
        let mut ranges = ServiceRanges::default();
        let mut added = Vec::new();
        for (name, entry) in file.services {
            if !is_valid_type_name(&name) {
                return Err(ConfigError::BadName(name));
            }
            let range = match entry.range {
                Some([start, end]) if start >= 1 && start <= end && end <= u32::from(u16::MAX) => {
                    Some((start as u16, end as u16))
                }
                Some([start, end]) => return Err(ConfigError::BadRange { name, start, end }),
                None => None,
            };
            let patterns = entry.patterns.into_iter().map(|p| p.to_lowercase());
            match ranges.types.iter_mut().find(|t| t.name == name) {
                Some(existing) => {
                    if let Some((start, end)) = range {
                        existing.start = start;
                        existing.end = end;
                    }
                    existing.patterns.extend(patterns);
                }
                None => {
                    let (start, end) =
                        range.ok_or_else(|| ConfigError::MissingRange(name.clone()))?;
                    added.push(ServiceType {
                        name,
                        start,
                        end,
                        patterns: patterns.collect(),
                    });
                }
            }
        }
        added.append(&mut ranges.types);
        ranges.types = added;
        Ok(ranges)
    }

    /// Every service type, in matching order.
    pub fn types(&self) -> &[ServiceType] {
        &self.types
    }

    /// The named type; an unknown name is an error that lists the known ones (and the nearest,
    /// for a typo such as `storybok`).
    pub fn get(&self, name: &str) -> Result<&ServiceType, UnknownServiceType> {
        self.types.iter().find(|t| t.name == name).ok_or_else(|| {
            let nearest = self
                .types
                .iter()
                .map(|t| (edit_distance(name, &t.name), &t.name))
                .filter(|(d, _)| *d <= 2)
                .min()
                .map(|(_, n)| n.clone());
            let mut known: Vec<String> = self.types.iter().map(|t| t.name.clone()).collect();
            known.sort();
            UnknownServiceType {
                name: name.to_string(),
                nearest,
                known,
            }
        })
    }

    /// The named type, or `dev` for a type nobody configured.
    pub fn get_or_fallback(&self, name: &str) -> &ServiceType {
        self.types
            .iter()
            .find(|t| t.name == name)
            .or_else(|| self.types.iter().find(|t| t.name == FALLBACK_TYPE))
            .unwrap_or(&self.types[0])
    }

    /// The service type whose range holds `port`, if any.
    pub fn type_of_port(&self, port: u16) -> Option<&ServiceType> {
        self.types.iter().find(|t| t.contains(port))
    }

    /// Where a bind of `port` may move to: the range of the service type that holds it, or else the
    /// `ADHOC_WINDOW` ports above it.
    pub fn move_range(&self, port: u16) -> PortRange {
        match self.type_of_port(port) {
            Some(t) => PortRange {
                service_type: t.name.clone(),
                start: t.start,
                end: t.end,
            },
            None => PortRange {
                service_type: FALLBACK_TYPE.to_string(),
                start: port,
                end: port.saturating_add(ADHOC_WINDOW),
            },
        }
    }

    /// The service type a command line belongs to; `dev` when nothing matches.
    pub fn infer(&self, cmdline: &str, comm: &str) -> &str {
        let haystacks = [cmdline.to_lowercase(), comm.to_lowercase()];
        self.types
            .iter()
            .find(|t| {
                t.patterns
                    .iter()
                    .any(|p| haystacks.iter().any(|h| contains_word(h, p)))
            })
            .map_or(FALLBACK_TYPE, |t| t.name.as_str())
    }
}

/// Whether `pattern` occurs in `text` with no letter or digit right before or after it, so that `next`
/// matches `next dev` and `/bin/next` but not `nextcloud`.
fn contains_word(text: &str, pattern: &str) -> bool {
    if pattern.is_empty() {
        return false;
    }
    let bytes = text.as_bytes();
    text.match_indices(pattern).any(|(at, _)| {
        let before = at.checked_sub(1).map(|i| bytes[i]);
        let after = bytes.get(at + pattern.len()).copied();
        !before.is_some_and(|b| b.is_ascii_alphanumeric())
            && !after.is_some_and(|b| b.is_ascii_alphanumeric())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_node_styxy_ranges() {
        let ranges = ServiceRanges::default();
        let get = |n: &str| {
            let t = ranges.get_or_fallback(n);
            (t.name.as_str(), t.start, t.end)
        };
        assert_eq!(get("dev"), ("dev", 3000, 3099));
        assert_eq!(get("storybook"), ("storybook", 6006, 6029));
        assert_eq!(get("api"), ("api", 8000, 8099));
        assert_eq!(get("ai"), ("ai", 11400, 11499));
        assert_eq!(get("coordination"), ("coordination", 9870, 9899));
        assert_eq!(get("no-such-type"), ("dev", 3000, 3099));
    }

    #[test]
    fn infers_service_types_from_command_lines() {
        let r = ServiceRanges::default();
        assert_eq!(r.infer("python3 -m http.server 8000", "python3"), "api");
        assert_eq!(
            r.infer("node /app/node_modules/.bin/storybook dev -p 6006", "node"),
            "storybook"
        );
        assert_eq!(r.infer("node /app/node_modules/.bin/vite", "node"), "dev");
        assert_eq!(r.infer("uvicorn main:app --port 8001", "uvicorn"), "api");
        assert_eq!(
            r.infer("/usr/bin/python3 /usr/local/bin/jupyter-lab", "jupyter-lab"),
            "ai"
        );
        assert_eq!(r.infer("next dev", "node"), "dev");
        assert_eq!(
            r.infer("nextcloud-sync", "nextcloud"),
            "dev",
            "falls back, no false word match"
        );
        assert_eq!(
            r.infer("redis-server *:6379", "redis-server"),
            "infrastructure"
        );
        assert_eq!(r.infer("", "mystery"), "dev");
    }

    #[test]
    fn move_range_is_the_requested_ports_range() {
        let r = ServiceRanges::default();
        assert_eq!(r.move_range(8000).service_type, "api");
        assert_eq!(
            (r.move_range(6006).start, r.move_range(6006).end),
            (6006, 6029)
        );
        let adhoc = r.move_range(20000);
        assert_eq!((adhoc.start, adhoc.end), (20000, 20100));
        assert_eq!(r.move_range(65500).end, 65535);
    }

    #[test]
    fn config_changes_ranges_and_adds_types_first() {
        let r = ServiceRanges::from_toml(
            r#"
            [services.storybook]
            range = [7000, 7019]
            patterns = ["My-Book"]
            [services.grpc]
            range = [9400, 9449]
            patterns = ["grpc-server"]
            "#,
        )
        .expect("valid config");
        let sb = r.get_or_fallback("storybook");
        assert_eq!((sb.start, sb.end), (7000, 7019));
        assert_eq!(r.infer("./my-book --serve", "x"), "storybook");
        assert_eq!(r.types()[0].name, "grpc");
        assert_eq!(r.infer("/opt/grpc-server", "grpc-server"), "grpc");
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        assert!(matches!(
            ServiceRanges::from_toml("[services"),
            Err(ConfigError::Toml(_))
        ));
        assert_eq!(
            ServiceRanges::from_toml("[services.Bad]\nrange = [1, 2]"),
            Err(ConfigError::BadName("Bad".into()))
        );
        assert!(matches!(
            ServiceRanges::from_toml("[services.x]\nrange = [10, 5]"),
            Err(ConfigError::BadRange { .. })
        ));
        assert!(matches!(
            ServiceRanges::from_toml("[services.x]\nrange = [0, 5]"),
            Err(ConfigError::BadRange { .. })
        ));
        assert!(matches!(
            ServiceRanges::from_toml("[services.x]\nrange = [1, 70000]"),
            Err(ConfigError::BadRange { .. })
        ));
        assert_eq!(
            ServiceRanges::from_toml("[services.x]\npatterns = [\"x\"]"),
            Err(ConfigError::MissingRange("x".into()))
        );
        assert!(matches!(
            ServiceRanges::from_toml("[other]\na = 1"),
            Err(ConfigError::Toml(_))
        ));
    }

    #[test]
    fn type_names_are_validated() {
        assert!(is_valid_type_name("api"));
        assert!(is_valid_type_name("my_svc.v2-beta"));
        assert!(!is_valid_type_name(""));
        assert!(!is_valid_type_name("API"));
        assert!(!is_valid_type_name("a b"));
        assert!(!is_valid_type_name(&"a".repeat(65)));
    }
}
