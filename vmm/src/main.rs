fn main() {
    eprintln!("keel-vmm: not yet implemented (see issue 3)");
    std::process::exit(1);
}
