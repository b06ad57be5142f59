//! The `tally` binary: parse the command line and hand over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = tally::config::Cli::parse();
    match tally::app::run_cli(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tally: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
