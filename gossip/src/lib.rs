//! Membership and cluster state: which nodes are in the mesh, which are alive, and what each
//! publishes about itself (role, models, addresses, engine load, a KV-prefix summary).
//!
//! Not built yet: this crate will run chitchat over the QUIC endpoint of `transport` (see
//! ARCHITECTURE.md, "What exists and what does not"). It holds no code until then, so nothing
//! can mistake an empty shell for working membership.
//!
//! Must not: make routing decisions (that is `policy`) or open sockets of its own.
