//! The cells backbone (ARCHITECTURE.md *Cells*): joining and leaving it as a gateway, and the
//! election that decides when (`[cells] elected_gateways`). What a gateway does while on it is
//! `crate::cells::gateway`.

use std::net::SocketAddr;
use std::sync::Arc;

use kvmesh_gossip::Membership;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Backbone, Mesh};
use crate::cells;
use crate::error::NodeError;

impl Mesh {
    /// Whether this node is one of its cell's gateways now.
    pub fn is_gateway(&self) -> bool {
        self.backbone.lock().map(|b| b.is_some()).unwrap_or(false)
    }

    /// Gateways per cell when they are elected (0: set in config, or no cells).
    pub fn elected_gateways(&self) -> usize {
        self.backbone_cfg.as_ref().map_or(0, |b| b.elected)
    }

    /// Joins the cells backbone and starts the gateway loop (`node::cells::gateway`); nothing
    /// when already on it or without cells. Besides the configured seeds, an elected gateway
    /// tries the nodes the cells table says other cells elect (their first members by name).
    pub async fn join_backbone(
        self: &Arc<Self>,
        cancel: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<(), NodeError> {
        let (Some(join), Some(cell)) = (&self.backbone_cfg, &self.cell) else { return Ok(()) };
        if self.is_gateway() {
            return Ok(());
        }
        let mut gossip = join.gossip.clone();
        if join.elected > 0 {
            for c in self.cells().iter().filter(|c| &c.report.name != cell) {
                let mut members: Vec<&(String, SocketAddr)> = c.members.iter().collect();
                members.sort();
                gossip.seeds.extend(members.iter().take(join.elected).map(|(_, a)| a.to_string()));
            }
            gossip.seeds.sort();
            gossip.seeds.dedup();
        }
        let inbox = self.endpoint.gossip_channel(1).map_err(|e| NodeError::Mesh(e.to_string()))?;
        let stop = cancel.child_token();
        let membership = match Membership::start(gossip, self.endpoint.clone(), inbox, &join.meta, &stop, tasks).await {
            Ok(m) => m,
            Err(e) => {
                self.endpoint.close_gossip_channel(1);
                return Err(NodeError::Mesh(format!("cells backbone: {e}")));
            }
        };
        tasks.spawn(crate::cells::gateway(
            cell.clone(),
            self.membership.clone(),
            membership.clone(),
            join.interval,
            stop.clone(),
        ));
        if let Ok(mut b) = self.backbone.lock() {
            *b = Some(Backbone { membership, stop });
        }
        tracing::info!(%cell, "joined the cells backbone as a gateway");
        Ok(())
    }

    /// Leaves the backbone (an elected gateway that is no longer elected): says goodbye there,
    /// stops the gateway loop, which withdraws the cells table it republished, and frees the
    /// gossip channel for a later term.
    pub async fn leave_backbone(&self) {
        let Some(b) = self.backbone.lock().ok().and_then(|mut b| b.take()) else { return };
        b.membership.leave().await;
        b.stop.cancel();
        self.endpoint.close_gossip_channel(1);
        tracing::info!(cell = ?self.cell, "left the cells backbone");
    }
}

/// Elected gateways (`[cells] elected_gateways`): every round of its cell's gossip, this node
/// joins the backbone when its cell's view elects it and leaves when it no longer does, so a cell keeps
/// its gateways when they die, drain or are replaced, with nothing to reconfigure.
pub(super) async fn elect(mesh: Arc<Mesh>, cancel: CancellationToken, tasks: TaskTracker) {
    let n = mesh.elected_gateways();
    let me = mesh.membership.node_id().to_owned();
    let mut tick = tokio::time::interval(mesh.membership.gossip_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let peers = mesh.membership.peers();
        let mine = cells::elected(&peers, n).contains(&me.as_str());
        if mine && !mesh.is_gateway() {
            if let Err(e) = mesh.join_backbone(&cancel, &tasks).await {
                tracing::warn!(error = %e, "elected gateway, but could not join the cells backbone");
            }
        } else if !mine && mesh.is_gateway() {
            mesh.leave_backbone().await;
        }
    }
}
