//! Admission: the steps every routed call takes before it reaches a backend, written once.
//!
//! The access layer has already authenticated the caller and applied its tenant's quota. Here
//! a call gets, in this order (the order of the refusals a caller sees):
//! 1. [`Admission::begin`]: the scope its API needs, its deadline, the route's size limit;
//! 2. [`Admission::route`]: the backend serving its model, and that backend's scope;
//! 3. [`Routed::slot`]: a fair slot of that backend's capacity, waited for until the deadline.
//!
//! The result, [`Admitted`], holds the slot until it is dropped: a unary call drops it with
//! its answer, a stream when it ends.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use marquee_core::ServeError;
use prost::Message;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::Gateway;
use crate::access::principal;
use crate::auth::Principal;
use crate::backend::{BackendPool, outgoing_for};
use crate::config::{Route, RouteName};
use crate::error::GatewayError;
use crate::quota::Slot;

/// A call past step 1: who calls, through which route, and by when it must be answered.
pub struct Admission<'a> {
    gw: &'a Gateway,
    route: RouteName,
    who: Arc<Principal>,
    deadline: Instant,
}

/// A call past step 2: routed to the backend serving its model.
pub struct Routed<'a> {
    gw: &'a Gateway,
    who: Arc<Principal>,
    deadline: Instant,
    backend: Arc<BackendPool>,
}

/// An admitted call: its backend, its deadline and its fair slot, held until this is dropped.
pub struct Admitted {
    pub backend: Arc<BackendPool>,
    pub deadline: Instant,
    /// The caller's tenant, as authenticated: forwarded to the backend.
    pub tenant: String,
    /// Held, not read: dropping it passes the slot to the next waiting tenant.
    pub slot: Slot,
}

impl<'a> Admission<'a> {
    /// Step 1; hands back the request's message for the steps that read it.
    pub fn begin<Req: Message>(
        gw: &'a Gateway,
        route: RouteName,
        req: Request<Req>,
    ) -> Result<(Self, Req), ServeError> {
        let who = principal(&req)?;
        if let Some(kind) = route.kind() {
            who.require(kind.scope())?;
        }
        let settings = gw.settings.routes.get(route);
        let deadline = deadline(req.metadata(), settings);
        let req = req.into_inner();
        check_size(route, settings, req.encoded_len())?;
        let call = Self {
            gw,
            route,
            who,
            deadline,
        };
        Ok((call, req))
    }

    /// Every step, for a call whose model is `model(&req)` (empty where the API has none).
    pub async fn admit<Req: Message>(
        gw: &'a Gateway,
        route: RouteName,
        req: Request<Req>,
        model: fn(&Req) -> &str,
    ) -> Result<(Admitted, Req), ServeError> {
        let (call, req) = Self::begin(gw, route, req)?;
        let admitted = call.route(model(&req)).await?.slot().await?;
        Ok((admitted, req))
    }

    /// Step 2.
    pub async fn route(self, model: &str) -> Result<Routed<'a>, ServeError> {
        let backend = self
            .gw
            .routing
            .backend_for(model, self.route.kind())
            .await?;
        self.who.require(backend.cfg.kind.scope())?;
        Ok(Routed {
            gw: self.gw,
            who: self.who,
            deadline: self.deadline,
            backend,
        })
    }
}

impl Routed<'_> {
    /// Step 3.
    pub async fn slot(self) -> Result<Admitted, ServeError> {
        let slot = self
            .backend
            .admit(&self.gw.quotas, &self.who.tenant, self.deadline)
            .await?;
        Ok(Admitted {
            backend: self.backend,
            deadline: self.deadline,
            tenant: self.who.tenant.clone(),
            slot,
        })
    }
}

impl Admitted {
    /// Sends a unary call to the backend, retried on another replica where that is safe, with
    /// the remaining deadline and the trace context; the backend's response is passed on.
    pub async fn unary<Req, Resp, F, Fut>(
        &self,
        method: &'static str,
        req: &Req,
        call: F,
    ) -> Result<Response<Resp>, GatewayError>
    where
        Req: Message + Clone,
        F: Fn(Channel, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        self.backend
            .call_remembering(method, self.deadline, req, |ch, t| {
                call(
                    ch,
                    outgoing_for(req.clone(), t, &self.tenant, &self.backend),
                )
            })
            .await
    }
}

/// When a call through `route` must be answered: the client's `grpc-timeout` capped at the
/// route's maximum, or the route's default; minus the same margin the backends use.
pub fn deadline(metadata: &tonic::metadata::MetadataMap, route: &Route) -> Instant {
    marquee_core::deadline::deadline_within(
        metadata,
        route.default_timeout_ms,
        route.max_timeout_ms,
    )
}

/// Refuses a request over the route's size limit.
pub fn check_size(name: RouteName, route: &Route, len: usize) -> Result<(), ServeError> {
    if len > route.max_request_bytes {
        return Err(ServeError::TooLarge {
            field: "request".into(),
            message: format!(
                "request is {len} bytes; the limit for this route (`routes.{}.max_request_bytes`) is {} bytes",
                name.as_str(),
                route.max_request_bytes
            ),
        });
    }
    Ok(())
}
