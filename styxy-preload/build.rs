//! Link the shim with `-z defs`: every symbol it uses must resolve against libc at build time.
//! Together with the release panic handler (which calls a symbol that exists nowhere), a release
//! build with any reachable panic fails to link instead of shipping a library that could abort its host.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,defs");
    println!("cargo:rerun-if-changed=build.rs");
}
