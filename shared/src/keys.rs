//! Every Redis key Spillway uses, built here. The pool is the Redis Cluster hash tag, so
//! every key one script touches lives in one slot.

use crate::store::{BackendId, PoolName};

#[derive(Clone, Debug)]
pub struct KeySchema {
    prefix: String,
}

/// The four keys of one pool member, in the order the scripts take them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberKeys {
    pub backoff: String,
    pub usage: String,
    pub latency: String,
    pub hints: String,
}

impl KeySchema {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    fn key(&self, pool: &PoolName, kind: &str, backend: &BackendId) -> String {
        format!("{}:{{{}}}:{kind}:{}", self.prefix, pool, backend)
    }

    /// A pool's open reservations (by id), for idempotent settles and releases.
    pub fn pending(&self, pool: &PoolName) -> String {
        format!("{}:{{{}}}:pending", self.prefix, pool)
    }

    /// A pool's queue of requests waiting in turn (a sorted set: ticket id by arrival).
    pub fn queue(&self, pool: &PoolName) -> String {
        format!("{}:{{{}}}:queue", self.prefix, pool)
    }

    /// The queue's tickets (a hash: id → `<estimate>|<alive until ms>`, `#next` → arrivals).
    pub fn tickets(&self, pool: &PoolName) -> String {
        format!("{}:{{{}}}:tickets", self.prefix, pool)
    }

    /// The cost ledger's hour starting at `hour_ms` (a hash; its own cluster slot).
    pub fn spend(&self, hour_ms: u64) -> String {
        format!("{}:spend:{{{hour_ms}}}", self.prefix)
    }

    /// The member holding a stored Responses API object (a hash: `pool`, `backend`; expires).
    pub fn response(&self, response_id: &str) -> String {
        format!("{}:response:{}", self.prefix, response_id)
    }

    /// A long-period quota counter (a string); the braces make the counter its own slot.
    pub fn quota(&self, counter: &str) -> String {
        format!("{}:quota:{{{}}}", self.prefix, counter)
    }

    /// A pool's generation marker: gone when Redis lost the pool's data (restarted empty,
    /// failed over to an empty node); set again by the replica that restores it.
    pub fn generation(&self, pool: &PoolName) -> String {
        format!("{}:{{{}}}:generation", self.prefix, pool)
    }

    /// The sorted set of live replicas (heartbeats).
    pub fn replicas(&self) -> String {
        format!("{}:replicas", self.prefix)
    }

    /// Each live replica's round trip to Redis (a hash), in the replicas' slot: its hash tag
    /// is the replicas key's whole name.
    pub fn replica_round_trips(&self) -> String {
        format!("{{{}}}:round_trips", self.replicas())
    }

    pub fn member(&self, pool: &PoolName, backend: &BackendId) -> MemberKeys {
        MemberKeys {
            backoff: self.key(pool, "backoff", backend),
            usage: self.key(pool, "usage", backend),
            latency: self.key(pool, "latency", backend),
            hints: self.key(pool, "hints", backend),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_readable_and_hash_tagged_by_pool() {
        let keys = KeySchema::new("spillway")
            .member(&PoolName::new("gpt-4o"), &BackendId::new("ptu-eastus"));
        assert_eq!(keys.backoff, "spillway:{gpt-4o}:backoff:ptu-eastus");
        assert_eq!(keys.usage, "spillway:{gpt-4o}:usage:ptu-eastus");
        assert_eq!(keys.latency, "spillway:{gpt-4o}:latency:ptu-eastus");
        assert_eq!(keys.hints, "spillway:{gpt-4o}:hints:ptu-eastus");
        let schema = KeySchema::new("spillway");
        assert_eq!(
            schema.generation(&PoolName::new("gpt-4o")),
            "spillway:{gpt-4o}:generation"
        );
        // heartbeat.lua writes both in one call: one slot in a cluster.
        assert_eq!(
            schema.replica_round_trips(),
            "{spillway:replicas}:round_trips"
        );
        let slot = |key: &str| fred::util::redis_keyslot(key.as_bytes());
        assert_eq!(
            slot(&schema.replicas()),
            slot(&schema.replica_round_trips())
        );
    }
}
