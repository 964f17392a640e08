//! The `saeflow` command: a thin binary over the library crates (`saeflow-core`, `saeflow-runner`,
//! `saeflow-stages`); one module per command under `cli/`, the report under `report/`.

mod bench;
mod cli;
mod report;

fn main() {
    std::process::exit(cli::main());
}
