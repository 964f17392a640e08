//! The `saeflow` command: a thin binary over the library crates (`saeflow-core`, `saeflow-runner`,
//! `saeflow-stages`); one module per command under `cli/`, the report under `report/`.

mod bench;
mod cli;
mod report;

// Big buffers on transparent huge pages: the SAE step's row reads miss the TLB less (`huge_pages`).
#[global_allocator]
static ALLOC: saeflow_core::huge_pages::HugePages = saeflow_core::huge_pages::HugePages;

fn main() {
    saeflow_core::huge_pages::keep_freed_blocks();
    std::process::exit(cli::main());
}
