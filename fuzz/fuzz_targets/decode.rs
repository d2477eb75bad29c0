//! Fuzzes the decoder: arbitrary bytes as the MessagePack payload of field `e` and as flat
//! field/value pairs (see `presence_worker_fuzz::check_decode`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| presence_worker_fuzz::check_decode(data));
