//! `styxy`: the daemon (`styxy daemon`) and its command-line client, in one binary.

fn main() -> std::process::ExitCode {
    styxy_cli::main()
}
