//! Path confinement: the client's operation path is parsed once into validated segments,
//! and upstream URLs are built only from the backend's base, the member's deployment and
//! those segments, so no request can leave the pool it was admitted to.
//!
//! Each segment passes `path_segment::check_segment` (the one rule, shared with the
//! configuration's deployment names).

use axum::http::Uri;
use axum::http::uri::{Parts, PathAndQuery};
use url::Url;

use crate::path_segment::{MAX_SEGMENTS, PathRejection, check_segment};
use crate::routing_table::UpstreamBase;

/// The operation part of a request path (`chat/completions`, `embeddings`, ...), validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperationPath {
    segments: Vec<String>,
}

impl OperationPath {
    /// Parse the raw (still percent-encoded) path after the pool or after `v1/`.
    pub fn parse(raw: &str) -> Result<Self, PathRejection> {
        if raw.is_empty() {
            return Err(PathRejection::Empty);
        }
        let segments: Vec<&str> = raw.split('/').collect();
        if segments.len() > MAX_SEGMENTS {
            return Err(PathRejection::TooManySegments);
        }
        for (i, segment) in segments.iter().enumerate() {
            check_segment(segment, i + 1)?;
        }
        Ok(Self {
            segments: segments.into_iter().map(str::to_owned).collect(),
        })
    }

    pub fn segments(&self) -> &[String] {
        &self.segments
    }
}

/// The client's query string as decoded pairs, re-encoded when the upstream URL is built.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueryPairs(Vec<(String, String)>);

impl QueryPairs {
    pub fn parse(raw: Option<&str>) -> Self {
        Self(
            raw.map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .into_owned()
                    .collect()
            })
            .unwrap_or_default(),
        )
    }
}

/// Which query parameters an upstream operation takes. Nothing else a client writes in its
/// query string reaches the backend: not `api-key`, not `deployment`, not parameters the
/// operation does not define.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryRule {
    /// Data-plane operations: `api-version` only.
    Operation,
    /// `GET responses/{id}`: and how to retrieve it.
    RetrieveResponse,
    /// `GET responses/{id}/input_items`: and the list's paging.
    ListInputItems,
}

impl QueryRule {
    /// The rule for a validated operation path and method.
    pub fn of(method: &axum::http::Method, operation: &OperationPath) -> Self {
        let segments = operation.segments();
        let get = method == axum::http::Method::GET;
        match segments {
            [first, _] if first == "responses" && get => Self::RetrieveResponse,
            [first, _, last] if first == "responses" && last == "input_items" && get => {
                Self::ListInputItems
            }
            _ => Self::Operation,
        }
    }

    fn allows(self, name: &str) -> bool {
        const RETRIEVE: &[&str] = &[
            "include",
            "include[]",
            "stream",
            "starting_after",
            "include_obfuscation",
        ];
        const LIST: &[&str] = &["include", "include[]", "after", "before", "limit", "order"];
        name == "api-version"
            || match self {
                Self::Operation => false,
                Self::RetrieveResponse => RETRIEVE.contains(&name),
                Self::ListInputItems => LIST.contains(&name),
            }
    }
}

impl QueryPairs {
    /// Only the pairs `rule` allows; a name given twice is kept once (the first), so the
    /// gateway and the backend cannot read different values. (`include[]` may repeat.)
    pub fn allowed(&self, rule: QueryRule) -> Self {
        let mut kept: Vec<(String, String)> = Vec::new();
        for (name, value) in &self.0 {
            let repeatable = name == "include[]";
            if rule.allows(name) && (repeatable || !kept.iter().any(|(k, _)| k == name)) {
                kept.push((name.clone(), value.clone()));
            }
        }
        Self(kept)
    }

    /// The value of the first pair named `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A Realtime session's upstream URL: the backend's host with a WebSocket scheme,
/// `/openai/realtime?api-version=...&deployment=<deployment>` (or `/openai/v1/realtime?model=`):
/// of the client's query only `api-version` (its first) is kept; the deployment is the
/// gateway's alone, whatever the client wrote in any letter case.
pub fn realtime_url(base: &Url, v1: bool, deployment: &str, query: &QueryPairs) -> Url {
    let mut url = base.clone();
    let scheme = if base.scheme() == "https" {
        "wss"
    } else {
        "ws"
    };
    url.set_scheme(scheme)
        .expect("http(s) and ws(s) are both special schemes");
    url.set_fragment(None);
    url.set_query(None);
    {
        let mut path = url
            .path_segments_mut()
            .expect("backend URLs are http(s) URLs with a host (validated in config)");
        path.pop_if_empty();
        if v1 {
            path.extend(["openai", "v1", "realtime"]);
        } else {
            path.extend(["openai", "realtime"]);
        }
    }
    let named = if v1 { "model" } else { "deployment" };
    let mut pairs = url.query_pairs_mut();
    for (k, v) in &query.allowed(QueryRule::Operation).0 {
        pairs.append_pair(k, v);
    }
    pairs.append_pair(named, deployment);
    drop(pairs);
    url
}

/// Which upstream API family the request is sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamApi<'a> {
    /// `/openai/deployments/{deployment}/{operation}`.
    Deployment(&'a str),
    /// `/openai/v1/{operation}`, the deployment named in the body.
    V1,
    /// `/openai/{operation}?api-version=...`: the deployment-less preview form of the
    /// Responses API, the deployment named in the body.
    Preview,
}

/// The upstream URL: `base` + the API prefix + validated segments + re-encoded query, as the
/// `url` crate's segment API builds it (percent-encoding anything that is not plain, so a
/// deployment name from configuration cannot add segments either): the reference
/// [`upstream_uri`] is tested against.
#[cfg(test)]
fn upstream_url(
    base: &Url,
    api: UpstreamApi<'_>,
    operation: &OperationPath,
    query: &QueryPairs,
) -> Url {
    let mut url = base.clone();
    url.set_query(None);
    url.set_fragment(None);
    {
        let mut path = url
            .path_segments_mut()
            .expect("backend URLs are http(s) URLs with a host (validated in config)");
        path.pop_if_empty();
        match api {
            UpstreamApi::Deployment(deployment) => {
                path.extend(["openai", "deployments", deployment]);
            }
            UpstreamApi::V1 => {
                path.extend(["openai", "v1"]);
            }
            UpstreamApi::Preview => {
                path.push("openai");
            }
        }
        path.extend(operation.segments());
    }
    if !query.0.is_empty() {
        url.query_pairs_mut().extend_pairs(&query.0);
    }
    url
}

/// The upstream URI of an attempt, as [`upstream_url`] writes it, built as one string on the
/// backend's split base (the hot path: no URL parsed or re-serialized per request).
pub fn upstream_uri(
    base: &UpstreamBase,
    api: UpstreamApi<'_>,
    operation: &OperationPath,
    query: &QueryPairs,
) -> Uri {
    let mut path = String::with_capacity(base.path.len() + 96);
    path.push_str(&base.path);
    match api {
        UpstreamApi::Deployment(deployment) => {
            path.push_str("/openai/deployments/");
            push_segment(&mut path, deployment);
        }
        UpstreamApi::V1 => path.push_str("/openai/v1"),
        UpstreamApi::Preview => path.push_str("/openai"),
    }
    for segment in operation.segments() {
        path.push('/');
        push_segment(&mut path, segment);
    }
    if !query.0.is_empty() {
        path.push('?');
        let start = path.len();
        path = url::form_urlencoded::Serializer::for_suffix(path, start)
            .extend_pairs(&query.0)
            .finish();
    }
    let mut parts = Parts::default();
    parts.scheme = Some(base.scheme.clone());
    parts.authority = Some(base.authority.clone());
    parts.path_and_query =
        Some(PathAndQuery::try_from(path).expect("segments and the query are percent-encoded"));
    Uri::from_parts(parts).expect("scheme, authority and path are all set")
}

/// A segment, percent-encoded but for RFC 3986's unreserved characters (validated
/// segments and deployment names have no others, so they go as they are).
fn push_segment(path: &mut String, segment: &str) {
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            path.push(b as char);
        } else {
            path.push('%');
            path.push(char::from(b"0123456789ABCDEF"[usize::from(b >> 4)]));
            path.push(char::from(b"0123456789ABCDEF"[usize::from(b & 15)]));
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn base() -> Url {
        Url::parse("http://127.0.0.1:9/").unwrap()
    }

    #[test]
    fn ordinary_operations_are_accepted() {
        for ok in [
            "chat/completions",
            "completions",
            "embeddings",
            "audio/transcriptions",
            "responses/resp_67cb71b351908190a308f3859487620d/input_items",
            "extensions/chat/completions",
            "v1.0~x_y-z",
        ] {
            assert!(OperationPath::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn traversal_variants_are_refused() {
        for bad in [
            "",
            "../../deployments/emb-ptu/embeddings",
            "./chat/completions",
            "%2e%2e/%2e%2e/deployments/emb-ptu/embeddings",
            "%2E%2E/%2E%2E/deployments/emb-ptu/embeddings",
            "%252e%252e/deployments/emb-ptu/embeddings",
            "..%2f..%2fdeployments/emb-ptu/embeddings",
            "chat%2fcompletions",
            "..%5c..%5cdeployments",
            "chat/completions;x=..",
            "/chat/completions",
            "chat//completions",
            "chat/completions/",
            "chat/completions.",
            "chat/completions..",
            "%c0%ae%c0%ae/deployments",
            "chat/compl\u{e9}tions",
            "chat\\completions",
            "a/b/c/d/e/f/g/h/i",
        ] {
            assert!(OperationPath::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn the_url_is_built_from_segments_and_reencoded_query() {
        let op = OperationPath::parse("chat/completions").unwrap();
        let query = QueryPairs::parse(Some("api-version=2024-10-21&x=a%26b+c"));
        let url = upstream_url(
            &Url::parse("https://contoso.openai.azure.com/prefix").unwrap(),
            UpstreamApi::Deployment("gpt-4o"),
            &op,
            &query,
        );
        assert_eq!(
            url.as_str(),
            "https://contoso.openai.azure.com/prefix/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21&x=a%26b+c"
        );
        let v1 = upstream_url(&base(), UpstreamApi::V1, &op, &QueryPairs::default());
        assert_eq!(v1.as_str(), "http://127.0.0.1:9/openai/v1/chat/completions");
    }

    proptest! {
        /// The hot path's URI is the URL the `url` crate builds, for any valid operation,
        /// deployment, base path and query.
        #[test]
        fn the_uri_is_the_url(
            base in prop::sample::select(vec![
                "http://127.0.0.1:9", "http://127.0.0.1:9/", "https://contoso.openai.azure.com/prefix",
                "https://contoso.openai.azure.com/prefix/", "https://[::1]:8443/a/b",
            ]),
            deployment in "[A-Za-z0-9_~-]{1,12}",
            operation in prop::sample::select(vec![
                "chat/completions", "embeddings", "responses/resp_1/input_items",
            ]),
            api in 0u8..3,
            query in prop::collection::vec(("[ -~]{0,8}", "[ -~\u{e9}]{0,8}"), 0..4),
        ) {
            let base = Url::parse(base).unwrap();
            let operation = OperationPath::parse(operation).unwrap();
            let api = match api {
                0 => UpstreamApi::Deployment(&deployment),
                1 => UpstreamApi::V1,
                _ => UpstreamApi::Preview,
            };
            let query = QueryPairs(query);
            let uri = upstream_uri(&UpstreamBase::of(&base), api, &operation, &query);
            prop_assert_eq!(uri.to_string(), upstream_url(&base, api, &operation, &query).to_string());
        }
    }

    #[test]
    fn a_deployment_name_cannot_add_segments() {
        let op = OperationPath::parse("embeddings").unwrap();
        let uri = upstream_uri(
            &UpstreamBase::of(&base()),
            UpstreamApi::Deployment("a/../b"),
            &op,
            &QueryPairs::default(),
        );
        assert_eq!(uri.path(), "/openai/deployments/a%2F..%2Fb/embeddings");
    }

    #[test]
    fn a_deployment_name_cannot_add_segments_to_the_url() {
        let op = OperationPath::parse("embeddings").unwrap();
        let url = upstream_url(
            &base(),
            UpstreamApi::Deployment("a/../b"),
            &op,
            &QueryPairs::default(),
        );
        assert_eq!(url.path(), "/openai/deployments/a%2F..%2Fb/embeddings");
    }

    #[test]
    fn only_the_operations_parameters_are_kept_once_each() {
        let query = QueryPairs::parse(Some(
            "api-version=2024-10-21&foo=bar&deployment=emb-ptu&api-key=x&api-version=1999-01-01&limit=5&include[]=a&include[]=b",
        ));
        let op = |path: &str| OperationPath::parse(path).unwrap();
        let get = axum::http::Method::GET;
        let plain = query.allowed(QueryRule::of(
            &axum::http::Method::POST,
            &op("chat/completions"),
        ));
        assert_eq!(plain.0, [("api-version".into(), "2024-10-21".into())]);
        let list = query.allowed(QueryRule::of(&get, &op("responses/resp_1/input_items")));
        assert_eq!(
            list.0.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["api-version", "limit", "include[]", "include[]"]
        );
        // DELETE and cancel take no more than any operation.
        let delete = QueryRule::of(&axum::http::Method::DELETE, &op("responses/resp_1"));
        assert_eq!(delete, QueryRule::Operation);
        let realtime = realtime_url(
            &base(),
            false,
            "gpt-4o-east",
            &QueryPairs::parse(Some(
                "api-version=2025-04-01-preview&Deployment=emb-ptu&DEPLOYMENT=x&deployment=y&intent=z",
            )),
        );
        assert_eq!(
            realtime.query(),
            Some("api-version=2025-04-01-preview&deployment=gpt-4o-east")
        );
    }

    proptest! {
        /// Whatever query a client writes, the upstream URL has the member's host and path,
        /// only parameters the operation takes, no credential, and (Realtime) exactly the
        /// gateway's deployment.
        #[test]
        fn no_client_query_changes_the_deployment_host_path_or_credential(
            pairs in proptest::collection::vec(
                (
                    "(api-version|API-VERSION|api-key|Api-Key|deployment|Deployment|model|MODEL|limit|include\\[\\]|@|%40|host|[a-z%&=#?/.]{1,8})",
                    "[a-zA-Z0-9%&=#?/:@. -]{0,12}",
                ),
                0..8,
            ),
            raw_suffix in "[a-z0-9%&=#?/:@.+-]{0,16}",
            get in any::<bool>(),
        ) {
            let mut raw: String = pairs
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("&");
            raw.push_str(&raw_suffix);
            let query = QueryPairs::parse(Some(&raw));
            let method = if get { axum::http::Method::GET } else { axum::http::Method::POST };
            for path in ["chat/completions", "responses/resp_1", "responses/resp_1/input_items"] {
                let op = OperationPath::parse(path).unwrap();
                let allowed = query.allowed(QueryRule::of(&method, &op));
                let url = upstream_url(&base(), UpstreamApi::Deployment("gpt-4o-east"), &op, &allowed);
                prop_assert_eq!(url.host_str(), Some("127.0.0.1"));
                prop_assert_eq!(url.port(), Some(9));
                prop_assert_eq!(url.path(), format!("/openai/deployments/gpt-4o-east/{path}"));
                prop_assert!(url.fragment().is_none());
                for (name, _) in url.query_pairs() {
                    prop_assert!(
                        ["api-version", "include", "include[]", "stream", "starting_after",
                         "include_obfuscation", "after", "before", "limit", "order"]
                            .contains(&name.as_ref()),
                        "{name} reached the backend from {raw:?}"
                    );
                }
            }
            let realtime = realtime_url(&base(), false, "gpt-4o-east", &query);
            prop_assert_eq!(realtime.host_str(), Some("127.0.0.1"));
            prop_assert_eq!(realtime.path(), "/openai/realtime");
            let deployments: Vec<String> = realtime
                .query_pairs()
                .filter(|(k, _)| !k.eq_ignore_ascii_case("api-version"))
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            prop_assert_eq!(deployments, ["deployment=gpt-4o-east".to_owned()]);
        }

        /// Whatever a client writes, an accepted path stays under the member's deployment (or
        /// under `/openai/v1/`), with exactly the segments that were validated.
        #[test]
        fn accepted_paths_stay_under_the_member(
            raw in "([a-z0-9._~%/;\\\\-]|%2[eEfF]|%25|\\.\\.|é){0,24}",
            query in "[a-z0-9=&%.+/-]{0,16}",
            v1 in any::<bool>(),
        ) {
            let Ok(op) = OperationPath::parse(&raw) else { return Ok(()); };
            let api = if v1 { UpstreamApi::V1 } else { UpstreamApi::Deployment("gpt-4o-east") };
            let url = upstream_url(&base(), api, &op, &QueryPairs::parse(Some(&query)));
            let prefix = if v1 { "/openai/v1/" } else { "/openai/deployments/gpt-4o-east/" };
            prop_assert!(url.path().starts_with(prefix), "{raw:?} -> {url}");
            let rest: Vec<&str> = url.path()[prefix.len()..].split('/').collect();
            prop_assert_eq!(rest, op.segments().iter().map(String::as_str).collect::<Vec<_>>());
            // A server re-parsing the URL sees the same path: nothing left to normalize.
            let reparsed = Url::parse(url.as_str()).unwrap();
            prop_assert_eq!(reparsed.path(), url.path());
        }
    }
}
