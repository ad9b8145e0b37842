//! `styxy open [NAME]`: the dashboard (`styxy.localhost`), or a server by its name
//! (`feature-x`, `storybook.feature-x`), in the browser — through the daemon's proxy, https
//! when it serves https. The URL is printed too, and is all there is with `--print` or without
//! a browser.

use anyhow::{bail, Result};
use styxy_proto::v1 as pb;

use super::Client;
use crate::output::call;

#[derive(Clone, Debug, clap::Args)]
pub(crate) struct Args {
    /// A name (`feature-x`, `storybook.feature-x`, `6006.feature-x.localhost`) [default: the dashboard]
    name: Option<String>,
    /// Print the URL and open nothing.
    #[arg(long)]
    print: bool,
}

pub(super) async fn run(client: &mut Client, args: Args) -> Result<()> {
    let status = call(client.status(pb::StatusRequest {}).await)?;
    let Some((scheme, listen)) =
        styxy_common::url::proxy_entry(&status.proxy_listen, &status.proxy_tls_listen)
    else {
        let why = if status.proxy_detail.is_empty() {
            "start it with --proxy 127.0.0.1:80 (and --proxy-tls 127.0.0.1:443), or install its \
             units (`styxy install`)"
                .to_string()
        } else {
            status.proxy_detail.clone()
        };
        bail!("the Styxy daemon serves no names: {why}");
    };
    let url = styxy_common::url::name_url(scheme, &host_of(args.name.as_deref()), listen);
    outln!("{url}");
    if args.print {
        return Ok(());
    }
    if let Err(why) = open_in_browser(&url) {
        eprintln!("styxy: {why}; open the URL above yourself (or set BROWSER)");
    }
    Ok(())
}

/// The host a name means: the dashboard without one, `NAME.localhost` for a bare name.
fn host_of(name: Option<&str>) -> String {
    match name.map(|n| n.trim().trim_end_matches('.').to_ascii_lowercase()) {
        None => styxy_common::url::DASHBOARD_HOST.to_string(),
        Some(n) if n.is_empty() => styxy_common::url::DASHBOARD_HOST.to_string(),
        Some(n) if n == "localhost" || n.ends_with(".localhost") => n,
        Some(n) => format!("{n}.localhost"),
    }
}

/// Runs `$BROWSER` (its first command that exists, as `xdg-open` reads it), else `xdg-open`,
/// without waiting for the browser.
fn open_in_browser(url: &str) -> Result<(), String> {
    let mut openers: Vec<String> = std::env::var("BROWSER")
        .map(|b| b.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    openers.push("xdg-open".into());
    for opener in openers.iter().filter(|o| !o.trim().is_empty()) {
        let mut words = opener.split_whitespace();
        let Some(program) = words.next() else {
            continue;
        };
        let spawned = std::process::Command::new(program)
            .args(words)
            .arg(url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if spawned.is_ok() {
            return Ok(());
        }
    }
    Err(format!(
        "no browser could be started (tried {})",
        openers.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_name_is_under_localhost_and_none_is_the_dashboard() {
        assert_eq!(host_of(None), "styxy.localhost");
        assert_eq!(host_of(Some("Feature-X")), "feature-x.localhost");
        assert_eq!(
            host_of(Some("storybook.feature-x")),
            "storybook.feature-x.localhost"
        );
        assert_eq!(host_of(Some("6006.shop.localhost.")), "6006.shop.localhost");
    }
}
