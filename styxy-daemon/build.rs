//! Puts the eBPF object inside the daemon (and so inside the one `styxy` binary) when the build
//! names one in `STYXY_EBPF_EMBED` — `cargo xtask build` and `cargo xtask dist` do, after building
//! the programs. Without it (a build without the eBPF toolchain, the test builds) the daemon looks
//! for the object as a file, and says why it runs on the socket tables when there is none.

use std::path::PathBuf;

fn main() {
    println!("cargo::rerun-if-env-changed=STYXY_EBPF_EMBED");
    println!("cargo::rustc-check-cfg=cfg(styxy_embedded_ebpf)");
    let Some(object) = std::env::var_os("STYXY_EBPF_EMBED").filter(|v| !v.is_empty()) else {
        return;
    };
    let object = PathBuf::from(object);
    println!("cargo::rerun-if-changed={}", object.display());
    if !object.is_file() {
        // A build asked to carry an object that is not there must not pass for one that does.
        panic!(
            "STYXY_EBPF_EMBED={}: no such file (build it with `cargo xtask build-ebpf --release`)",
            object.display()
        );
    }
    let object = object.canonicalize().unwrap_or(object);
    println!("cargo::rustc-cfg=styxy_embedded_ebpf");
    println!("cargo::rustc-env=STYXY_EBPF_EMBEDDED={}", object.display());
}
