//! Reshaping while serving (`tramctl scale`): the wanted shape changes, the leader plans the
//! new placement over the same workers and stores it with the plan (a standby that takes over
//! finishes it); the new replicas load beside the old ones (each worker holds its old rank
//! and its new one at once), then the old ones retire at a step boundary, one by one, their
//! requests moving to the new ones: capacity never drops below the old shape's. A shape the
//! model cannot take, or the workers cannot hold (old and new ranks together while loading),
//! is refused with the arithmetic.

use cluster::layout::Layout;

use super::{ControlError, Controller, PlannedReplica, Reply, ScaleTo, Scaled};
use crate::planner::{self, ReplicaPlan, Wanted};

/// `tp 4 × ep 1 × pp 1`.
fn words(l: &Layout) -> String {
    format!("tp {} × ep {} × pp {}", l.tp, l.ep, l.pp)
}

/// `tp 4 × ep 1 × pp 1` (and `, at most 2 replica(s)`).
fn shape_name(w: &Wanted) -> String {
    let replicas = if w.replicas > 0 { format!(", at most {} replica(s)", w.replicas) } else { String::new() };
    format!("{}{replicas}", words(&w.layout))
}

/// Bytes in GB, or in MB or KB when smaller.
fn gb(bytes: u64) -> String {
    match bytes as f64 {
        b if b >= 1e9 => format!("{:.2} GB", b / 1e9),
        b if b >= 1e6 => format!("{:.2} MB", b / 1e6),
        b => format!("{:.1} KB", b / 1e3),
    }
}

impl Controller {
    /// Changes the wanted shape, once checked: the model takes it, the usable workers hold at
    /// least one replica of it, and every worker that serves now can hold its old rank and its
    /// new one at once. Answered when the new plan is stored (at once when nothing changes).
    pub(super) fn scale(&mut self, to: ScaleTo, reply: Reply<Result<Scaled, ControlError>>) {
        let now = &self.want.layout;
        let pick = |n: usize, was: usize| if n == 0 { was } else { n };
        let pp = pick(to.pp, now.pp);
        let layout =
            Layout { tp: pick(to.tp, now.tp), ep: pick(to.ep, now.ep), pp, stage_layers: if pp == now.pp { now.stage_layers.clone() } else { Vec::new() } };
        let wanted = Wanted { layout, replicas: to.replicas };
        let shape = shape_name(&wanted);
        if let Err(e) = wanted.layout.validate(&self.cfg.config) {
            let _ = reply.send(Err(ControlError::BadShape { shape, why: e.to_string() }));
            return;
        }
        let usable = self.usable();
        let current = self.current().into_iter().filter(|r| r.layout == wanted.layout).collect::<Vec<_>>();
        let refuse = |why: String| Err(ControlError::Shape { shape: shape.clone(), why });
        let planned = match planner::plan_wanted(&self.cfg.config, &wanted, &self.cfg.sizing, &usable, &current) {
            Err(why) => {
                let _ = reply.send(refuse(why));
                return;
            }
            Ok(p) if !p.iter().any(|r| r.layout == wanted.layout) => {
                let (w, kv) = planner::rank_memory(&self.cfg.config, &wanted.layout, &self.cfg.sizing);
                let why = format!(
                    "the {} usable worker(s) hold no replica of it ({} ranks of {} weights + {} KV cache each); they would hold {}",
                    usable.len(),
                    wanted.layout.world(),
                    gb(w),
                    gb(kv),
                    p.iter().map(|r| words(&r.layout)).collect::<Vec<_>>().join(", ")
                );
                let _ = reply.send(refuse(why));
                return;
            }
            Ok(p) => p,
        };
        if let Some(why) = self.cannot_hold_both(&planned) {
            let _ = reply.send(refuse(why));
            return;
        }
        tracing::info!(%shape, "scaling the cluster");
        self.want = wanted;
        self.reshaping = true;
        self.scale_waiters.push(reply);
        self.reconcile();
        if self.placing.is_none() && !self.dirty {
            // Nothing to change: the cluster has that shape.
            self.reshaping = false;
            self.answer_scaled(self.epoch);
        }
    }

    /// Why a worker that serves now cannot load its rank of `planned` beside its old one
    /// (weights and KV cache of both), if one cannot.
    fn cannot_hold_both(&self, planned: &[ReplicaPlan]) -> Option<String> {
        let (c, s) = (&self.cfg.config, &self.cfg.sizing);
        for new in planned.iter().filter(|p| !self.live.iter().any(|r| r.plan.same_ranks(p))) {
            for (rank, id) in new.workers.iter().enumerate() {
                let Some(card) = self.cards.get(id).filter(|c| c.memory_bytes > 0) else { continue };
                let Some((old, old_rank)) = self.live.iter().find_map(|r| r.plan.workers.iter().position(|w| w == id).map(|k| (&r.plan.layout, k))) else {
                    continue;
                };
                let (ow, okv) = planner::rank_need(c, old, old_rank, s);
                let (nw, nkv) = planner::rank_need(c, &new.layout, rank, s);
                if ow + okv + nw + nkv > card.memory_bytes {
                    return Some(format!(
                        "worker {id} would hold its {} rank ({} + {} KV cache) and its new rank ({} + {} KV cache) at once while the new replica loads, {} in all, but it offers {}",
                        words(old),
                        gb(ow),
                        gb(okv),
                        gb(nw),
                        gb(nkv),
                        gb(ow + okv + nw + nkv),
                        gb(card.memory_bytes)
                    ));
                }
            }
        }
        None
    }

    /// The replicas a plan keeps: the live ones, but while reshaping only those of the wanted
    /// layout (the others are placed anew).
    pub(super) fn kept_by_plan(&self) -> Vec<ReplicaPlan> {
        let current = self.current();
        match self.reshaping {
            true => current.into_iter().filter(|r| r.layout == self.want.layout).collect(),
            false => current,
        }
    }

    /// Replicas with what their largest rank holds.
    pub(super) fn with_memory(&self, replicas: Vec<ReplicaPlan>) -> Vec<PlannedReplica> {
        replicas
            .into_iter()
            .map(|plan| {
                let (weight_bytes, kv_bytes) = planner::rank_memory(&self.cfg.config, &plan.layout, &self.cfg.sizing);
                PlannedReplica { plan, weight_bytes, kv_bytes }
            })
            .collect()
    }

    /// Tells who waits for a reshape that its plan of `epoch` is stored.
    pub(super) fn answer_scaled(&mut self, epoch: u64) {
        let (waiters, replicas) = match &mut self.placing {
            Some(p) => (std::mem::take(&mut p.waiters), p.wanted.clone()),
            None => (std::mem::take(&mut self.scale_waiters), self.current()),
        };
        if waiters.is_empty() {
            return;
        }
        let scaled = Scaled { epoch, replicas: self.with_memory(replicas) };
        for w in waiters {
            let _ = w.send(Ok(scaled.clone()));
        }
    }
}
