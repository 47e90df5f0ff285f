fn main() {
    eprintln!("keelctl: no verbs yet (see issue 7)");
    std::process::exit(1);
}
