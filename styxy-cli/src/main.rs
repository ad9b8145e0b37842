//! `styxy`: the daemon (`styxy daemon`) and its command-line client, in one binary.

/// Counts the live heap for the daemon's metrics (`styxy_heap_live_bytes`).
#[global_allocator]
static ALLOCATOR: styxy_daemon::heap::CountingAllocator = styxy_daemon::heap::CountingAllocator;

fn main() -> std::process::ExitCode {
    styxy_daemon::heap::counting_installed();
    styxy_cli::main()
}
