fn main() {
    std::process::exit(saeflow::cli::main());
}
