//! The replicas serving in the current placement epoch, as the controller publishes them to
//! the frontends (a `watch` of [`Pool`]).

use crate::planner::ReplicaPlan;
use crate::replica::ReplicaHandle;

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
    /// The least-loaded replica whose task still runs.
    pub(crate) fn pick(&self) -> Option<&ReplicaHandle> {
        self.replicas.iter().map(|r| &r.handle).filter(|h| h.is_alive()).min_by_key(|h| h.active())
    }
}
