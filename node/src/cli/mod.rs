//! The command-line tools that are not the node itself: benchmarks (`bench`), the local demo
//! mesh (`demo`) and the cluster simulator's front end (`simulate`). Private to the binary:
//! they use the node library's public API like any other program would.

pub mod bench;
pub mod bench_flow;
pub mod bench_gossip;
pub mod bench_routing;
pub mod bench_tokenize;
pub mod demo;
pub mod simulate;
