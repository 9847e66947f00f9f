//! The replicas serving in the current placement epoch, as the controller publishes them to
//! the frontends (a `watch` of [`Pool`]).

use cluster::kv_cache::BlockHash;

use crate::planner::ReplicaPlan;
use crate::replica::ReplicaHandle;

/// How requests are spread over replicas (the coordinator's `--routing` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct Routing {
    /// Where a request goes: `cache-aware` (where its longest cached prefix lives, within the
    /// load slack) or `least-loaded`.
    #[arg(long = "routing", value_enum, default_value_t = Policy::CacheAware)]
    pub policy: Policy,
    /// Cache-aware routing sends a request only to replicas with at most this many more
    /// active requests than the least-loaded one.
    #[arg(long = "routing-load-slack", default_value_t = 8)]
    pub load_slack: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    CacheAware,
    LeastLoaded,
}

impl Default for Routing {
    fn default() -> Self {
        Routing { policy: Policy::CacheAware, load_slack: 8 }
    }
}

/// A replica serving now.
#[derive(Clone)]
pub struct LiveReplica {
    pub handle: ReplicaHandle,
    pub plan: ReplicaPlan,
    /// Worker API addresses, by rank.
    pub addresses: Vec<String>,
}

/// The replicas serving in the current placement epoch; replaced as a whole when it changes.
#[derive(Clone, Default)]
pub struct Pool {
    pub epoch: u64,
    pub replicas: Vec<LiveReplica>,
    /// Set when the live workers cannot hold any replica: requests fail with this message
    /// instead of waiting for capacity.
    pub no_capacity: Option<String>,
    /// Whether this coordinator leads the cluster (a standby serves no replica).
    pub leading: bool,
}

impl Pool {
    /// The replica a request whose context's full blocks hash to `prefix` goes to, among
    /// those whose task still runs. Least-loaded: fewest active requests. Cache-aware: among
    /// the replicas within `load_slack` active requests of the least-loaded, the one holding
    /// the most of `prefix`'s leading blocks, then the least loaded. The score is exact: the
    /// replicas publish the hashes of the blocks they hold.
    pub(crate) fn pick(&self, prefix: &[BlockHash], routing: Routing) -> Option<&ReplicaHandle> {
        // One reading of each replica's load: the choice is made on a consistent snapshot.
        let live: Vec<(&ReplicaHandle, usize)> = self.replicas.iter().map(|r| &r.handle).filter(|h| h.is_alive()).map(|h| (h, h.active())).collect();
        let least = live.iter().map(|&(_, active)| active).min()?;
        if routing.policy == Policy::LeastLoaded || prefix.is_empty() {
            return live.into_iter().min_by_key(|&(_, active)| active).map(|(h, _)| h);
        }
        live.into_iter()
            .filter(|&(_, active)| active <= least + routing.load_slack)
            .map(|(h, active)| (h.cached_prefix(prefix), active, h))
            .min_by_key(|&(cached, active, _)| (std::cmp::Reverse(cached), active))
            .map(|(_, _, h)| h)
    }
}
