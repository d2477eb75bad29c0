//! Fuzzes the batch coalescer: arbitrary bytes read as a small batch of events (see
//! `presence_worker_fuzz::check_coalesce`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| presence_worker_fuzz::check_coalesce(data));
