//! The QUIC endpoint between nodes: mutual TLS with the cluster's CA, pooled peer connections,
//! framed request streams, the gossip carrier, and certificate tooling.
//!
//! Not built yet (see ARCHITECTURE.md, "What exists and what does not"); it holds no code until
//! then. Must not: parse OpenAI requests or know about routing; it moves authenticated bytes.
