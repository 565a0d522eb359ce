//! `GET /openai/v1/models` (and `/v1/models`): the pools a consumer may use, in OpenAI's list
//! shape, so SDK code that lists models before choosing one works unchanged. A pool is listed
//! when the consumer may use it (its `pools`) and a member is in a region it may use.

use axum::Json;
use serde_json::{Value, json};

use crate::auth::consumers::Consumer;
use crate::error::GatewayError;
use crate::proxy::Gateway;
use crate::routing_table::Pool;

/// The pools `consumer` may use (authenticated before: `app::Caller`).
pub fn list(gateway: &Gateway, consumer: Option<&Consumer>) -> Json<Value> {
    let regions = consumer.and_then(|c| c.regions.as_deref());
    let data: Vec<Value> = gateway
        .table
        .pools()
        .filter(|pool| consumer.is_none_or(|c| c.may_use(pool.name.as_str())))
        .filter(|pool| usable(pool, regions))
        .map(|pool| model(pool))
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

/// One pool, or 404 when it does not exist or the consumer may not use it.
pub fn retrieve(
    gateway: &Gateway,
    consumer: Option<&Consumer>,
    name: &str,
) -> Result<Json<Value>, GatewayError> {
    let regions = consumer.and_then(|c| c.regions.as_deref());
    let allowed = consumer.is_none_or(|c| c.may_use(name));
    match gateway.table.pool(name) {
        Some(pool) if allowed && usable(pool, regions) => Ok(Json(model(pool))),
        _ => Err(GatewayError::UnknownPool(name.to_owned())),
    }
}

/// Some member is in the pool's regions and in the consumer's (each when set).
fn usable(pool: &Pool, consumer_regions: Option<&[String]>) -> bool {
    pool.members_in(pool.regions.as_deref()).any(|m| {
        consumer_regions.is_none_or(|allowed| {
            m.backend
                .region
                .as_ref()
                .is_some_and(|r| allowed.contains(r))
        })
    })
}

fn model(pool: &Pool) -> Value {
    json!({ "id": pool.name.as_str(), "object": "model", "created": 0, "owned_by": "spillway" })
}
