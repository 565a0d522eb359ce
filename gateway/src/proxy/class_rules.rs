//! The fleet-state call that places a request, as its traffic class has it: the top class
//! as any request; a lower class with its line on each PTU member, waiting in the pool's
//! queue (`overflow = "wait"`), or in shadow mode tried below the line first and counted.

use spillway_shared::{Admission, Candidate};
use tokio::time::Instant;

use super::shadow::{Marks, Rule};
use super::{Placement, queue_wait};
use crate::config::Overflow;
use crate::error::GatewayError;
use crate::proxy::Gateway;
use crate::routing_table::Member;

/// Admit the request on the first of `order` its class allows, or say why none would.
pub async fn acquire(
    gateway: &Gateway,
    placement: &Placement<'_>,
    order: &[&Member],
    (marks, deadline): (&Marks, Instant),
) -> Result<Admission, GatewayError> {
    let (pool, class) = (placement.pool, placement.class);
    let tokens = placement.estimate.total();
    let plain = || order.iter().map(|m| pool.candidate(m)).collect::<Vec<_>>();
    if class.keeps_reserve {
        return Ok(gateway.fleet.acquire(&pool.name, &plain(), tokens).await?);
    }
    let with_line = |m: &&Member| Candidate {
        ceiling: class.ceiling(m),
        ..pool.candidate(m)
    };
    let below_line: Vec<Candidate> = order
        .iter()
        .filter(|m| m.backend.provisioned())
        .map(with_line)
        .collect();
    if below_line.is_empty() {
        // No PTU left to try: the class's rules have nothing to decide.
        return Ok(gateway.fleet.acquire(&pool.name, &plain(), tokens).await?);
    }
    if class.shadowed() {
        // Shadow mode: the PTU below the line first, exactly as enforcement would ask. When
        // it has no room, the request is served as the top class would be, and counted when
        // enforcement would have refused it (`refuse`, `wait`) or when only the reserve
        // admitted it on the PTU (enforcement would have sent it to PAYG).
        let admission = gateway
            .fleet
            .acquire(&pool.name, &below_line, tokens)
            .await?;
        if matches!(admission, Admission::Admitted { .. }) {
            return Ok(admission);
        }
        let admission = gateway.fleet.acquire(&pool.name, &plain(), tokens).await?;
        let on_ptu = matches!(&admission, Admission::Admitted { backend, .. }
            if pool.member(backend).is_some_and(|m| m.backend.provisioned()));
        if class.overflow != Overflow::Payg || on_ptu {
            let pool = pool.name.as_str();
            marks.would_refuse(Rule::Reserve, pool, placement.consumer, &class.name);
        }
        return Ok(admission);
    }
    if class.waits() {
        // Its members are the PTU's (`Class::may_use`): wait in the pool's queue for room.
        let mut waiting = queue_wait::Waiting::new(gateway.fleet.clone(), pool.name.clone());
        let until = deadline.min(Instant::now() + class.max_wait);
        let admission = waiting.admit(&below_line, tokens, until).await?;
        let admitted = matches!(admission, Admission::Admitted { .. });
        crate::ops::metrics::queue_wait(
            pool.name.as_str(),
            &class.name,
            waiting.waited(),
            admitted,
        );
        return Ok(admission);
    }
    let candidates: Vec<Candidate> = order.iter().map(with_line).collect();
    Ok(gateway
        .fleet
        .acquire(&pool.name, &candidates, tokens)
        .await?)
}
