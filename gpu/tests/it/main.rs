//! blyan-gpu integration tests (one binary, as the style guide asks).

mod blocks;
mod cli;
mod common;
mod delta;
mod engine;
mod errors;
mod generation;
mod moe;
mod parity;
mod pol;
mod stage;
