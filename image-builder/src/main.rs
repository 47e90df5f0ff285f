fn main() {
    eprintln!("keel-image: not yet implemented");
    std::process::exit(1);
}
