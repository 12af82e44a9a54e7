//! `petrel`: convert, build, inspect, check, unpack, mount and serve lazily loaded
//! container images.

/// `println!` that ends the program quietly when stdout is a closed pipe
/// (`petrel inspect IMG --tree | head`) instead of panicking.
macro_rules! outln {
    () => {
        $crate::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` with the same handling of a closed pipe as `outln!`.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::write_stdout(format_args!($($arg)*))
    };
}

mod cli;

/// Writes to stdout; a reader that went away ends the program with status 0, as
/// there is nobody left to tell.
fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("petrel: error: writing to stdout: {error}");
        std::process::exit(1);
    }
}

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    if !matches!(args.command, cli::Command::Mount(_)) {
        // A mount logs at its spec's level, which may come from a file: it sets up its own.
        cli::init_logging(args.verbose, args.log_format);
    }
    match cli::run(args) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("petrel: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
