//! Multi-node tests of the mesh over simulated networks (virtual time, loss, partitions) and
//! real ones (network namespaces). Not built yet: there is no mesh to test until `transport`
//! and `gossip` exist (see ARCHITECTURE.md). Must not: be a dependency of any shipped crate.
