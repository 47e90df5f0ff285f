//! Prints every diagnostic of a config file: `cargo run -p keel-init --example check_config FILE`.
fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: check_config FILE");
        std::process::exit(2);
    };
    match keel_init::config::load_file(std::path::Path::new(&path)) {
        Ok(l) => print!("{}", l.warnings.render(&path)),
        Err(e) => println!("{e}"),
    }
}
