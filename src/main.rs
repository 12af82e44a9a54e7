//! `petrel`: convert, build, inspect, check, unpack, mount and serve lazily loaded
//! container images.

mod cli;
mod convert;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    cli::init_logging(args.verbose);
    match cli::run(args) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("petrel: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
