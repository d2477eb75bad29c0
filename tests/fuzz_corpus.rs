//! Replays the fuzzing seed corpus (`fuzz/corpus/<target>/`) through the same checks the fuzz
//! targets run, so CI keeps every input found once without needing libFuzzer or nightly Rust.
//! Run the fuzzers themselves as `fuzz/README.md` says.

#[path = "../fuzz/src/lib.rs"]
mod checks;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// Runs `check` on every file of `fuzz/corpus/<target>/`; fails naming each input that panicked.
fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no input", dir.display());
    let mut failed = Vec::new();
    for path in &files {
        let data = std::fs::read(path).expect("corpus file");
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    println!("{target}: replayed {} inputs", files.len());
    assert!(
        failed.is_empty(),
        "{target}: {} of {} inputs fail (the panic of each is printed above):\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
}

#[test]
fn decode_corpus_passes_the_decoder_checks() {
    replay("decode", checks::check_decode);
}

#[test]
fn coalesce_corpus_passes_the_coalescer_checks() {
    replay("coalesce", checks::check_coalesce);
}

/// The readings of the input the corpus files were written for (a change to them would quietly
/// turn the seeds into other inputs).
#[test]
fn input_readings_are_stable() {
    let flat = checks::split_flat(b"type\xffjoin\xffsession");
    assert_eq!(
        flat,
        vec![
            (b"type".to_vec(), b"join".to_vec()),
            (b"session".to_vec(), Vec::new())
        ]
    );
    let batch = checks::batch_from_bytes(&[1, 3 * 9, 0x25, 9, 0, 0, 0, 0, 0x80]);
    assert_eq!(batch.len(), 2);
    let (sid, ev) = &batch[0];
    assert_eq!(sid.ms, 1_700_000_000_009);
    assert_eq!(ev.kind, presence_worker::EventType::Join);
    assert_eq!((ev.doc.as_str(), ev.user.as_str()), ("d1", "u1"));
    assert_eq!(ev.session.as_deref(), Some("tab1"));
    assert_eq!(
        (ev.seq, ev.meta.as_ref().map(|m| m.len())),
        (Some(5), Some(1))
    );
    assert_eq!(batch[1].1, batch[0].1, "an exact re-append");
}
