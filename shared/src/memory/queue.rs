//! One pool's queue of requests waiting for room (`FleetState::acquire_in_turn`), as the
//! embedded store keeps it; `acquire.lua` keeps Redis's by the same rules.

use std::collections::{BTreeMap, HashMap};

use crate::store::Ticket;

#[derive(Debug, Default)]
pub struct Queue {
    next: u64,
    /// Arrival order → the ticket's id, its request's estimate, and until when it holds its
    /// place (store clock, ms).
    waiting: BTreeMap<u64, (String, u64, u64)>,
    by_id: HashMap<String, u64>,
}

impl Queue {
    /// Join the queue with `ticket` (at the end), or renew its place; the estimates of the
    /// live tickets ahead of it. Tickets not renewed in time leave first.
    pub fn renew(&mut self, ticket: &Ticket, estimate: u64, now_ms: u64) -> u64 {
        self.waiting.retain(|_, (_, _, until)| *until > now_ms);
        self.by_id.retain(|_, seq| self.waiting.contains_key(seq));
        let until = now_ms + ticket.alive.as_millis() as u64;
        let seq = *self.by_id.entry(ticket.id.clone()).or_insert_with(|| {
            self.next += 1;
            self.next
        });
        self.waiting
            .insert(seq, (ticket.id.clone(), estimate, until));
        self.waiting
            .range(..seq)
            .map(|(_, (_, estimate, _))| estimate)
            .sum()
    }

    pub fn leave(&mut self, id: &str) {
        if let Some(seq) = self.by_id.remove(id) {
            self.waiting.remove(&seq);
        }
    }
}
