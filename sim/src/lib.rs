//! The engine simulator: a stand-in for one vLLM server that is faithful on the wire.
//!
//! Owns: vLLM's OpenAI HTTP surface (`/v1/chat/completions`, `/v1/completions`, `/v1/models`,
//! `/health`, `/metrics` with vLLM's metric names, `/reset_prefix_cache`; and, in `api`'s
//! submodules, `/v1/responses`, Anthropic's `/v1/messages`, the pooling routes, `/tokenize`,
//! `/detokenize` and the audio routes), its KV-cache events
//! (ZeroMQ PUB, msgpack, vLLM's framing), a paged KV-cache model with prefix reuse and LRU
//! eviction, and a continuous-batching scheduler whose step time follows the formula and sourced
//! constants in `timing`.
//!
//! Must not: know anything about kvmesh's mesh, routing or gossip. Whatever talks to this crate's
//! server must work unchanged against a real vLLM, so nothing here may offer a kvmesh-only
//! shortcut on the product path. The cluster simulator (`kvmesh-clustersim`, its own crate)
//! reuses `engine` and `timing` in virtual time.

pub mod api;
pub mod config;
pub mod engine;
pub mod error;
pub mod filler;
pub mod kv_cache;
pub mod kv_events;
pub mod metrics;
pub mod nixl;
pub mod offload;
pub mod runner;
pub mod server;
pub mod timing;
pub mod workload;

pub use config::EngineConfig;
pub use error::SimError;
pub use server::{EngineSim, RunningEngine};
