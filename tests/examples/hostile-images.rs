//! Writes the hostile image corpus (`marquee_e2e::hostile::corpus`) to a folder, one file per
//! image, and an `index.tsv` of `file<TAB>expected gRPC status`, for clients in other languages:
//! `cargo run -p marquee-e2e --example hostile-images -- DIR`.

fn main() -> std::io::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "hostile-images".into());
    std::fs::create_dir_all(&dir)?;
    let mut index = String::new();
    for item in marquee_e2e::hostile::corpus() {
        let file = format!("{}.bin", item.name);
        std::fs::write(dir.join(&file), &item.bytes)?;
        index.push_str(&format!("{file}\t{:?}\n", item.expect));
    }
    std::fs::write(dir.join("index.tsv"), index)?;
    println!("wrote the corpus to {}", dir.display());
    Ok(())
}
