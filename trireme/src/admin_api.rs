//! The node's admin API: HTTP + JSON on loopback, used by the `trireme` CLI.
//!
//! ```text
//! GET    /v1/health                  {"node", "datacenter", "pid"}
//! GET    /v1/volumes                 [VolumeInfo]
//! POST   /v1/volumes                 {"name","size","tenant"?,"class"?,"chunk_size"?} -> VolumeInfo
//! GET    /v1/volumes/{name}          VolumeInfo
//! POST   /v1/volumes/{name}/resize   {"size"} -> VolumeInfo
//! POST   /v1/volumes/{name}/read-only {"read_only": bool} -> VolumeInfo
//! DELETE /v1/volumes/{name}
//! GET    /v1/snapshots               [SnapshotInfo] (every volume's)
//! GET    /v1/volumes/{name}/snapshots [SnapshotInfo]
//! POST   /v1/volumes/{name}/snapshots {"name"} -> SnapshotInfo
//! DELETE /v1/volumes/{name}/snapshots/{snap} -> {"freed_bytes"}
//! POST   /v1/volumes/{name}/snapshots/{snap}/rollback {"force"?} -> RollbackInfo
//! POST   /v1/volumes/{name}/snapshots/{snap}/clone {"name","tenant"?} -> VolumeInfo
//! GET    /v1/tenants                 [TenantInfo]
//! POST   /v1/tenants                 {"name"} -> TenantInfo
//! DELETE /v1/tenants/{name}          {"deleted_volumes": [...]}
//! ```
//! Errors are `{"error": "one line"}` with 400 (invalid), 404 (unknown name),
//! 409 (name taken, or refused in the current state: attached, has clones), 501 (not
//! available here) or 500.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use engine::{Engine, EngineError, StorageClass, VolumeSpec};
use serde::Deserialize;
use serde_json::json;

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The node's engine.
    pub engine: Arc<Engine>,
    /// Node name.
    pub node: String,
    /// Datacenter label.
    pub datacenter: String,
}

/// An engine error as an HTTP answer.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let status = match &e {
            EngineError::NoSuchVolume(_)
            | EngineError::NoSuchTenant(_)
            | EngineError::NoSuchSnapshot(_) => StatusCode::NOT_FOUND,
            EngineError::VolumeExists(_)
            | EngineError::TenantExists(_)
            | EngineError::SnapshotExists(_)
            | EngineError::Busy(_) => StatusCode::CONFLICT,
            EngineError::Invalid(_) => StatusCode::BAD_REQUEST,
            EngineError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
            _ => {
                tracing::error!(error = %e, "admin request failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

/// Run a blocking engine call (rocksdb syncs) off the async workers.
async fn blocking<T, F>(state: &AdminState, f: F) -> Result<T, ApiError>
where
    F: FnOnce(&Engine) -> Result<T, EngineError> + Send + 'static,
    T: Send + 'static,
{
    let engine = state.engine.clone();
    tokio::task::spawn_blocking(move || f(&engine))
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("admin task failed: {e}"),
            )
        })?
        .map_err(ApiError::from)
}

fn ok<T: serde::Serialize>(status: StatusCode, v: T) -> ApiResult {
    Ok((status, Json(v)).into_response())
}

#[derive(Debug, Deserialize)]
struct CreateVolume {
    name: String,
    size: u64,
    tenant: Option<String>,
    class: Option<String>,
    chunk_size: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Resize {
    size: u64,
}

#[derive(Debug, Deserialize)]
struct ReadOnly {
    read_only: bool,
}

#[derive(Debug, Deserialize)]
struct CreateTenant {
    name: String,
}

#[derive(Debug, Deserialize)]
struct CreateSnapshot {
    name: String,
}

#[derive(Debug, Default, Deserialize)]
struct Rollback {
    #[serde(default)]
    force: bool,
}

#[derive(Debug, Deserialize)]
struct CloneVolume {
    name: String,
    tenant: Option<String>,
}

async fn health(State(s): State<AdminState>) -> ApiResult {
    ok(
        StatusCode::OK,
        json!({ "node": s.node, "datacenter": s.datacenter, "pid": std::process::id() }),
    )
}

async fn list_volumes(State(s): State<AdminState>) -> ApiResult {
    ok(StatusCode::OK, blocking(&s, |e| e.list_volumes()).await?)
}

async fn create_volume(State(s): State<AdminState>, Json(req): Json<CreateVolume>) -> ApiResult {
    let class = match req.class.as_deref() {
        None => StorageClass::Local,
        Some(c) => c
            .parse()
            .map_err(|e: String| ApiError(StatusCode::BAD_REQUEST, e))?,
    };
    let spec = VolumeSpec {
        name: req.name,
        size: req.size,
        tenant: req.tenant,
        class,
        chunk_size: req.chunk_size,
    };
    ok(
        StatusCode::CREATED,
        blocking(&s, move |e| e.create_volume(&spec)).await?,
    )
}

async fn volume_info(State(s): State<AdminState>, Path(name): Path<String>) -> ApiResult {
    ok(
        StatusCode::OK,
        blocking(&s, move |e| e.volume_info(&name)).await?,
    )
}

async fn resize_volume(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    Json(req): Json<Resize>,
) -> ApiResult {
    ok(
        StatusCode::OK,
        blocking(&s, move |e| e.resize_volume(&name, req.size)).await?,
    )
}

async fn set_read_only(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    Json(req): Json<ReadOnly>,
) -> ApiResult {
    ok(
        StatusCode::OK,
        blocking(&s, move |e| e.set_read_only(&name, req.read_only)).await?,
    )
}

async fn delete_volume(State(s): State<AdminState>, Path(name): Path<String>) -> ApiResult {
    blocking(&s, move |e| e.delete_volume(&name)).await?;
    ok(StatusCode::OK, json!({}))
}

async fn list_tenants(State(s): State<AdminState>) -> ApiResult {
    ok(StatusCode::OK, blocking(&s, |e| e.list_tenants()).await?)
}

async fn create_tenant(State(s): State<AdminState>, Json(req): Json<CreateTenant>) -> ApiResult {
    ok(
        StatusCode::CREATED,
        blocking(&s, move |e| e.create_tenant(&req.name)).await?,
    )
}

async fn delete_tenant(State(s): State<AdminState>, Path(name): Path<String>) -> ApiResult {
    let deleted = blocking(&s, move |e| e.delete_tenant(&name)).await?;
    ok(StatusCode::OK, json!({ "deleted_volumes": deleted }))
}

async fn list_all_snapshots(State(s): State<AdminState>) -> ApiResult {
    ok(
        StatusCode::OK,
        blocking(&s, |e| e.list_snapshots(None)).await?,
    )
}

async fn list_snapshots(State(s): State<AdminState>, Path(name): Path<String>) -> ApiResult {
    ok(
        StatusCode::OK,
        blocking(&s, move |e| e.list_snapshots(Some(&name))).await?,
    )
}

async fn create_snapshot(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    Json(req): Json<CreateSnapshot>,
) -> ApiResult {
    let info = s.engine.create_snapshot(&name, &req.name).await?;
    ok(StatusCode::CREATED, info)
}

async fn delete_snapshot(
    State(s): State<AdminState>,
    Path((name, snap)): Path<(String, String)>,
) -> ApiResult {
    let freed = s.engine.delete_snapshot(&name, &snap).await?;
    ok(StatusCode::OK, json!({ "freed_bytes": freed }))
}

async fn rollback_snapshot(
    State(s): State<AdminState>,
    Path((name, snap)): Path<(String, String)>,
    Json(req): Json<Rollback>,
) -> ApiResult {
    let info = s.engine.rollback_snapshot(&name, &snap, req.force).await?;
    ok(StatusCode::OK, info)
}

async fn clone_volume(
    State(s): State<AdminState>,
    Path((name, snap)): Path<(String, String)>,
    Json(req): Json<CloneVolume>,
) -> ApiResult {
    let info = s
        .engine
        .clone_volume(&format!("{name}@{snap}"), &req.name, req.tenant.as_deref())
        .await?;
    ok(StatusCode::CREATED, info)
}

/// The admin API's routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(volume_info).delete(delete_volume))
        .route("/v1/volumes/{name}/resize", post(resize_volume))
        .route("/v1/volumes/{name}/read-only", post(set_read_only))
        .route("/v1/snapshots", get(list_all_snapshots))
        .route(
            "/v1/volumes/{name}/snapshots",
            get(list_snapshots).post(create_snapshot),
        )
        .route(
            "/v1/volumes/{name}/snapshots/{snap}",
            axum::routing::delete(delete_snapshot),
        )
        .route(
            "/v1/volumes/{name}/snapshots/{snap}/rollback",
            post(rollback_snapshot),
        )
        .route(
            "/v1/volumes/{name}/snapshots/{snap}/clone",
            post(clone_volume),
        )
        .route("/v1/tenants", get(list_tenants).post(create_tenant))
        .route("/v1/tenants/{name}", axum::routing::delete(delete_tenant))
        .with_state(state)
}
