//! The CLI's side of the admin API.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use serde_json::Value;

/// A client for one node's admin API.
#[derive(Debug)]
pub struct AdminClient {
    agent: ureq::Agent,
    base: String,
    node: String,
}

impl AdminClient {
    /// A client for the node `node` at `addr`.
    pub fn new(node: &str, addr: SocketAddr) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        AdminClient {
            agent,
            base: format!("http://{addr}"),
            node: node.to_string(),
        }
    }

    fn unreachable(&self, e: ureq::Error) -> anyhow::Error {
        anyhow!(
            "node {} is not running (admin API at {}: {e})",
            self.node,
            self.base
        )
    }

    fn answer(&self, mut resp: ureq::http::Response<ureq::Body>) -> Result<Value> {
        let status = resp.status();
        let body: Value = resp.body_mut().read_json().unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body);
        }
        match body.get("error").and_then(Value::as_str) {
            Some(msg) => bail!("{msg}"),
            None => bail!("node {} answered {status}", self.node),
        }
    }

    /// GET a path.
    pub fn get(&self, path: &str) -> Result<Value> {
        let resp = self
            .agent
            .get(&format!("{}{path}", self.base))
            .call()
            .map_err(|e| self.unreachable(e))?;
        self.answer(resp)
    }

    /// POST JSON to a path.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let resp = self
            .agent
            .post(&format!("{}{path}", self.base))
            .send_json(body)
            .map_err(|e| self.unreachable(e))?;
        self.answer(resp)
    }

    /// DELETE a path.
    pub fn delete(&self, path: &str) -> Result<Value> {
        let resp = self
            .agent
            .delete(&format!("{}{path}", self.base))
            .call()
            .map_err(|e| self.unreachable(e))?;
        self.answer(resp)
    }

    /// Whether the node answers its health check within `timeout`.
    pub fn is_up(addr: SocketAddr, timeout: Duration) -> bool {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .build()
            .into();
        agent
            .get(&format!("http://{addr}/v1/health"))
            .call()
            .is_ok_and(|r| r.status().is_success())
    }
}
