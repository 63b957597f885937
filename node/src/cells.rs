//! Cells on the node (`policy::cells`, ARCHITECTURE.md *Cells*): the cells table as this node's
//! cell gossips it, and what a gateway does to keep it current.
//!
//! A gateway is in two chitchat clusters on one QUIC endpoint: its cell (channel 0) and the
//! backbone of all cells' gateways (channel 1). Every `backbone_interval_ms` it publishes its
//! own cell's report and members on the backbone, and republishes every cell's (its own
//! included) into its cell under `cell.{name}` and `cellm.{name}`. A plain member reads the
//! table from its cell's gateways; it never joins the backbone, so no node's gossip grows with
//! the number of nodes in other cells.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kvmesh_gossip::schema::{cell_key, cell_members_key, KEY_CELL, KEY_CELL_MEMBERS};
use kvmesh_gossip::{CellMember, CellReport, Membership, Peer};
use tokio_util::sync::CancellationToken;

/// One cell as this node sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct CellView {
    pub report: CellReport,
    pub members: Vec<(String, SocketAddr)>,
}

/// The cells table from this cell's view: per cell, the copy of the gateway with the smallest
/// node id that has one (gateways of a cell republish the same backbone state).
pub fn table(peers: &[Peer]) -> Vec<CellView> {
    let mut sorted: Vec<&Peer> = peers.iter().filter(|p| !p.cell_keys.is_empty()).collect();
    sorted.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    let mut out: BTreeMap<String, CellView> = BTreeMap::new();
    for p in sorted {
        let get = |k: &str| p.cell_keys.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        for (key, value) in &p.cell_keys {
            let Some(name) = key.strip_prefix(&format!("{KEY_CELL}.")) else { continue };
            if out.contains_key(name) {
                continue;
            }
            let Ok(report) = serde_json::from_str::<CellReport>(value) else { continue };
            let members = get(&cell_members_key(name))
                .and_then(|m| serde_json::from_str::<Vec<CellMember>>(m).ok())
                .unwrap_or_default()
                .into_iter()
                .filter_map(|m| Some((m.name, m.addr.parse().ok()?)))
                .collect();
            out.insert(name.to_owned(), CellView { report, members });
        }
    }
    out.into_values().collect()
}

/// This cell's report and members from its own gossip view.
fn own(cell: &str, peers: &[Peer]) -> (CellReport, Vec<CellMember>) {
    let mut report = CellReport { name: cell.to_owned(), engines: 0, load: 0.0 };
    let mut members = Vec::new();
    for p in peers {
        let whole: Vec<_> = p.load.engines.iter().filter(|e| e.healthy && e.role.serves_whole()).collect();
        if whole.is_empty() {
            continue;
        }
        report.engines += whole.len() as u32;
        report.load += whole.iter().map(|e| f64::from(e.running) + f64::from(e.waiting)).sum::<f64>();
        members.push(CellMember { name: p.node_id.clone(), addr: p.meta.quic_addr.clone() });
    }
    members.sort_by(|a, b| a.name.cmp(&b.name));
    (report, members)
}

/// A gateway's loop: publish this cell on the backbone, republish the backbone into the cell.
pub async fn gateway(
    cell: String,
    membership: Arc<Membership>,
    backbone: Arc<Membership>,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut published: HashSet<String> = HashSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                // Stepping down (or shutting down): withdraw the copies this node republished,
                // or they would outlive its term in the cell's tables.
                for name in &published {
                    membership.delete_cell_key(&cell_key(name)).await;
                    membership.delete_cell_key(&cell_members_key(name)).await;
                }
                break;
            }
            _ = tick.tick() => {}
        }
        let (report, members) = own(&cell, &membership.peers());
        let (Ok(r), Ok(m)) = (serde_json::to_string(&report), serde_json::to_string(&members)) else { continue };
        backbone.set_cell_key(KEY_CELL, r).await;
        backbone.set_cell_key(KEY_CELL_MEMBERS, m).await;
        // Every cell on the backbone (this one included), one copy each: the gateway with the
        // smallest node id among those publishing it.
        let mut cells: BTreeMap<String, (String, String)> = BTreeMap::new();
        let mut peers: Vec<Peer> = backbone.peers().iter().cloned().collect();
        peers.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        for p in &peers {
            let get = |k: &str| p.cell_keys.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
            let (Some(r), Some(m)) = (get(KEY_CELL), get(KEY_CELL_MEMBERS)) else { continue };
            let Ok(rep) = serde_json::from_str::<CellReport>(&r) else { continue };
            cells.entry(rep.name).or_insert((r, m));
        }
        for (name, (r, m)) in &cells {
            membership.set_cell_key(&cell_key(name), r.clone()).await;
            membership.set_cell_key(&cell_members_key(name), m.clone()).await;
        }
        for gone in published.iter().filter(|n| !cells.contains_key(*n)) {
            membership.delete_cell_key(&cell_key(gone)).await;
            membership.delete_cell_key(&cell_members_key(gone)).await;
        }
        published = cells.into_keys().collect();
    }
}

/// The nodes a cell elects as gateways from a member's view: the `n` smallest node ids among
/// its live members (`is_self` included). Every member with the same view agrees; while views
/// differ (a join, a death) two nodes may both serve for a round, which costs a duplicate
/// copy, not a wrong table (`table` keeps one copy per cell).
pub fn elected(peers: &[Peer], n: usize) -> Vec<&str> {
    let mut ids: Vec<&str> = peers.iter().map(|p| p.node_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    ids.truncate(n);
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvmesh_gossip::{EngineLoad, KvSummarySlot, LoadReport, NodeMeta, NodeRole, UsageReport};

    fn peer(name: &str, engines: &[(u32, u32)], cell_keys: Vec<(String, String)>) -> Peer {
        Peer {
            node_id: name.into(),
            generation: 1,
            addr: "127.0.0.1:7000".parse().expect("addr"),
            meta: NodeMeta {
                role: NodeRole::Worker,
                models: vec![],
                http_addr: "127.0.0.1:8000".into(),
                quic_addr: format!("127.0.0.{}:7000", name.len()),
            },
            load: LoadReport {
                engines: engines
                    .iter()
                    .map(|(running, waiting)| EngineLoad {
                        name: "e".into(),
                        models: vec![],
                        healthy: true,
                        role: Default::default(),
                        running: *running,
                        waiting: *waiting,
                        kv_usage: 0.1,
                        tokens_per_s: 0.0,
                        block_size: Some(16),
                        cards: Vec::new(),
                        max_model_len: None,
                        ttft_fit: None,
                    })
                    .collect(),
                ..Default::default()
            },
            kv: KvSummarySlot::default(),
            kv_shards: vec![],
            usage: UsageReport::default(),
            cell_keys,
            is_self: false,
        }
    }

    #[test]
    fn a_cell_elects_its_smallest_node_ids() {
        let peers =
            [peer("n3", &[], vec![]), peer("n1", &[], vec![]), peer("edge", &[], vec![]), peer("n2", &[], vec![])];
        assert_eq!(elected(&peers, 2), ["edge", "n1"]);
        assert_eq!(elected(&peers[..1], 2), ["n3"], "a cell of one elects it");
        assert!(elected(&peers, 0).is_empty());
    }

    #[test]
    fn a_cells_report_counts_engines_and_load_and_lists_members_with_engines() {
        let peers = [peer("a", &[(2, 1)], vec![]), peer("edge", &[], vec![]), peer("b", &[(3, 0), (1, 1)], vec![])];
        let (r, m) = own("c1", &peers);
        assert_eq!((r.name.as_str(), r.engines, r.load), ("c1", 3, 8.0));
        assert_eq!(m.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn the_table_takes_one_copy_per_cell_and_skips_garbage() {
        let entry = |name: &str, load: f64| {
            vec![
                (cell_key(name), serde_json::to_string(&CellReport { name: name.into(), engines: 2, load }).unwrap()),
                (cell_members_key(name), r#"[{"name":"x","addr":"10.0.0.1:7946"},{"name":"y","addr":"bad"}]"#.into()),
            ]
        };
        let mut g2 = entry("c1", 9.0);
        g2.push((cell_key("junk"), "{not json".into()));
        let peers = [peer("g2", &[], g2), peer("g1", &[], [entry("c1", 5.0), entry("c2", 1.0)].concat())];
        let t = table(&peers);
        assert_eq!(t.len(), 2, "{t:?}");
        assert_eq!(t[0].report.load, 5.0, "g1's copy wins: smallest node id");
        assert_eq!(
            t[0].members,
            vec![("x".to_string(), "10.0.0.1:7946".parse().unwrap())],
            "unparsable address dropped"
        );
        assert_eq!(t[1].report.name, "c2");
    }
}
