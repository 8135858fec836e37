//! Every committed corpus input (and every crash kept under `regressions/`) through its target,
//! on stable, without libFuzzer: `cargo test --no-default-features` in `fuzz/`.

use std::path::Path;

#[test]
fn every_corpus_input_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut ran = 0;
    for (name, target) in llm_ratelimit_fuzz::TARGETS {
        for dir in [root.join("corpus").join(name), root.join("regressions").join(name)] {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                if std::panic::catch_unwind(|| target(&data)).is_err() {
                    panic!("{name}: {} fails", path.display());
                }
                ran += 1;
            }
        }
    }
    assert!(ran > 0, "no corpus found");
    println!("{ran} inputs passed");
}
