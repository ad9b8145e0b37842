//! The kernel contract, checked against the built object: every map the kernel programs define
//! is in `styxy_common::maps::MAPS` with the same kind, key and value sizes, capacity and flags,
//! and every map of the contract is in the object. (The daemon takes maps by the contract's
//! names, so a map renamed on one side only fails here, not at load time on a user's machine.)
//! Reads the object file only: needs `cargo xtask build-ebpf`, not root.

use anyhow::{Context, Result};
use styxy_common::maps::{spec_of, MAPS};

/// Maps the object holds that are not Styxy's: the data sections (`.bss`, `.data`, `.rodata`,
/// holding the programs' globals) and aya-log's own.
fn not_ours(name: &str) -> bool {
    name.starts_with('.') || name.starts_with("AYA_")
}

#[test]
fn the_objects_maps_are_the_contracts() -> Result<()> {
    let Some(path) = styxy_tests::ebpf_object() else {
        return Ok(());
    };
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let object = aya_obj::Object::parse(&bytes).context("parsing the eBPF object")?;
    let mut problems = Vec::new();
    for (name, map) in object.maps.iter().filter(|(name, _)| !not_ours(name)) {
        let Some(spec) = spec_of(name) else {
            problems.push(format!("{name}: in the object, not in the contract"));
            continue;
        };
        let seen = (
            map.map_type(),
            map.key_size(),
            map.value_size(),
            map.max_entries(),
            map.map_flags(),
        );
        let agreed = (
            spec.kind as u32,
            spec.key_size,
            spec.value_size,
            spec.max_entries,
            spec.flags,
        );
        if seen != agreed {
            problems.push(format!(
                "{name}: (type, key, value, entries, flags) {seen:?} in the object, {agreed:?} in the contract"
            ));
        }
    }
    for spec in MAPS {
        if !object.maps.contains_key(spec.name) {
            problems.push(format!("{}: in the contract, not in the object", spec.name));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The object defines maps of its own beyond the data sections (so the filter hides nothing
    // that matters).
    assert!(object.maps.keys().filter(|n| !not_ours(n)).count() == MAPS.len());
    Ok(())
}
