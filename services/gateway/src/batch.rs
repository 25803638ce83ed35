//! Cross-client batching: single-item calls for the same model from any number of clients are
//! coalesced into one batched backend call: `Classify` → `ClassifyBatch`, and OIP `ModelInfer`
//! requests with the same input layout → one `ModelInfer` whose batch dimension is their sum.
//!
//! A batch goes out at once whenever fewer than `max_batches_in_flight` batch calls are
//! running, so a lone call never waits; while the backend is busy, items accumulate and go out
//! together when a call returns, when `max_batch` rows are waiting, or after
//! `max_batch_delay_us`. Each caller gets exactly its own result, and a bad item fails only its
//! own call.
//!
//! Batch keys come from client-chosen fields, so they are validated and bounded before an
//! entry exists: a `ModelInfer` payload must match its declared shape (or the request is
//! refused alone, before it can shift other callers' rows), names are short, unusual keys
//! (an unknown version, a large `top_k`, many outputs) pass through unbatched, and the map holds
//! at most `max_batch_keys` entries, each dropped once idle for `batch_key_idle_ms`.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use marquee_core::ServeError;
use marquee_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use marquee_proto::inference::model_infer_response::InferOutputTensor;
use marquee_proto::inference::{InferTensorContents, ModelInferRequest, ModelInferResponse};
use marquee_proto::vision::classify_batch_item::Result as ItemResult;
use marquee_proto::vision::image_service_client::ImageServiceClient;
use marquee_proto::vision::{ClassifyBatchRequest, ClassifyRequest, ImageInput, Label};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use tokio::sync::oneshot;
use tonic::{Code, Status};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::backend::{BackendPool, outgoing};
use crate::config::Route;
use crate::error::GatewayError;
use crate::metrics::GatewayMetrics;

/// Backend responses can be as large as a request is allowed to be.
const MAX_BACKEND_MESSAGE: usize = 64 << 20;

/// Longest model, version, input or output name a batch key may hold. Names are directory and
/// tensor names; a longer one is hostile, and would make every key (and the NOT_FOUND message
/// echoing it) as large as the request.
pub const MAX_NAME_BYTES: usize = 256;
/// Most requested outputs in a batchable `ModelInfer`; more pass through unbatched.
pub const MAX_BATCHED_OUTPUTS: usize = 16;
/// Highest rank of a batchable `ModelInfer` input (TensorRT's and most frameworks' limit);
/// higher ranks pass through unbatched.
pub const MAX_BATCHED_RANK: usize = 8;
/// Largest `top_k` a `Classify` is batched with (the backends' models have 10 and 1000
/// classes); larger values pass through unbatched and the backend judges them.
pub const MAX_BATCHED_TOP_K: u32 = 100;

/// Refuses a name that is too long or holds anything but visible ASCII (`field` names it).
pub fn check_name(field: &str, value: &str) -> Result<(), ServeError> {
    if value.len() > MAX_NAME_BYTES {
        return Err(ServeError::invalid(
            field,
            format!(
                "`{field}` is {} bytes; at most {MAX_NAME_BYTES} are allowed",
                value.len()
            ),
        ));
    }
    if let Some(c) = value.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(ServeError::invalid(
            field,
            format!("`{field}` holds {c:?}; names are visible ASCII characters without spaces"),
        ));
    }
    Ok(())
}

/// How one kind of call is batched and sent.
pub trait Dispatch: Send + Sync + 'static {
    type Item: Send + 'static;
    type Output: Send + 'static;
    /// Metric label of the route.
    const ROUTE: &'static str;
    /// Rows an item adds to a batch.
    fn rows(item: &Self::Item) -> usize;
    /// Sends `items` as one backend call; one result per item, in order.
    fn dispatch(
        &self,
        backend: &BackendPool,
        items: Vec<Self::Item>,
        deadline: Instant,
    ) -> impl Future<Output = Vec<Result<Self::Output, GatewayError>>> + Send;
}

struct Pending<D: Dispatch> {
    item: D::Item,
    deadline: Instant,
    tx: oneshot::Sender<Result<D::Output, GatewayError>>,
    /// The caller's span, linked from the batch span that carries its item.
    link: SpanContext,
}

struct State<D: Dispatch> {
    items: Vec<Pending<D>>,
    rows: usize,
    in_flight: usize,
    timer_armed: bool,
    /// When an item last arrived: the idle sweep drops entries unused for a while.
    last_used: Instant,
}

/// The coalescer of one batch key (backend, model and call shape).
pub struct Coalescer<D: Dispatch> {
    /// The model, for messages (the full key can be kilobytes).
    what: String,
    dispatch: D,
    route: Route,
    backend: Arc<BackendPool>,
    metrics: GatewayMetrics,
    state: Mutex<State<D>>,
}

impl<D: Dispatch> Coalescer<D> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<D>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues one item and waits for its result.
    pub async fn call(
        self: &Arc<Self>,
        item: D::Item,
        deadline: Instant,
    ) -> Result<D::Output, GatewayError> {
        let (tx, rx) = oneshot::channel();
        let send_now = {
            let mut st = self.lock();
            st.last_used = Instant::now();
            st.rows += D::rows(&item);
            st.items.push(Pending {
                item,
                deadline,
                tx,
                link: tracing::Span::current()
                    .context()
                    .span()
                    .span_context()
                    .clone(),
            });
            if st.in_flight < self.route.max_batches_in_flight || st.rows >= self.route.max_batch {
                Some(self.take(&mut st))
            } else {
                if !st.timer_armed {
                    st.timer_armed = true;
                    let me = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_micros(me.route.max_batch_delay_us))
                            .await;
                        let batch = {
                            let mut st = me.lock();
                            st.timer_armed = false;
                            (!st.items.is_empty()).then(|| me.take(&mut st))
                        };
                        if let Some(b) = batch {
                            me.send(b).await;
                        }
                    });
                }
                None
            }
        };
        if let Some(batch) = send_now {
            let me = self.clone();
            tokio::spawn(async move { me.send(batch).await });
        }
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ServeError::unavailable("batch was dropped").into()),
            Err(_) => Err(ServeError::DeadlineExceeded(format!(
                "deadline expired waiting for model `{}` through the gateway",
                self.what
            ))
            .into()),
        }
    }

    /// Takes up to `max_batch` rows (at least one item) and counts a batch call in flight.
    fn take(&self, st: &mut State<D>) -> Vec<Pending<D>> {
        st.in_flight += 1;
        let mut rows = 0;
        let mut n = 0;
        for p in &st.items {
            let r = D::rows(&p.item);
            if n > 0 && rows + r > self.route.max_batch {
                break;
            }
            rows += r;
            n += 1;
        }
        st.rows -= rows;
        st.items.drain(..n).collect()
    }

    /// Sends one batch, hands each caller its result, then sends what queued meanwhile.
    async fn send(self: Arc<Self>, mut batch: Vec<Pending<D>>) {
        loop {
            // Callers that already gave up need no compute.
            batch.retain(|p| !p.tx.is_closed());
            if !batch.is_empty() {
                let rows: usize = batch.iter().map(|p| D::rows(&p.item)).sum();
                self.metrics
                    .batch_size
                    .with_label_values(&[D::ROUTE])
                    .observe(rows as f64);
                let deadline = batch
                    .iter()
                    .map(|p| p.deadline)
                    .max()
                    .expect("non-empty, this is a bug");
                // One backend call serves callers of many traces: a root span linked to each
                // caller's span (as the model services' batch spans are), so the backend call
                // and everything under it stay connected to every request it carried.
                let span = tracing::info_span!(
                    "gateway.batch",
                    route = D::ROUTE,
                    rows,
                    items = batch.len()
                );
                for p in &batch {
                    if p.link.is_valid() {
                        span.add_link(p.link.clone());
                    }
                }
                let (items, txs): (Vec<_>, Vec<_>) =
                    batch.into_iter().map(|p| (p.item, p.tx)).unzip();
                let results = self
                    .dispatch
                    .dispatch(&self.backend, items, deadline)
                    .instrument(span)
                    .await;
                for (tx, r) in txs.into_iter().zip(results) {
                    let _ = tx.send(r);
                }
            }
            let next = {
                let mut st = self.lock();
                st.in_flight -= 1;
                (!st.items.is_empty()).then(|| self.take(&mut st))
            };
            match next {
                Some(b) => batch = b,
                None => return,
            }
        }
    }
}

/// Every coalescer of one kind, by backend and key, at most `route.max_batch_keys` of them.
///
/// An entry nobody holds (no caller waiting, no batch in flight, no timer armed) carries no
/// state, so dropping it loses nothing: when the map is full a new key evicts such an entry,
/// and the sweep drops entries unused for `route.batch_key_idle_ms`. When every entry is in
/// use, a call with a new key passes through unbatched, as Envoy's overflow does, rather than
/// wait or fail. The backend is part of the key: a model that moves to another backend gets a
/// new entry, and the old one idles out.
pub struct Coalescers<K, D: Dispatch> {
    route: Route,
    metrics: GatewayMetrics,
    map: Mutex<KeyMap<K, D>>,
}

/// Coalescers by (backend name, key).
type KeyMap<K, D> = HashMap<(String, K), Arc<Coalescer<D>>>;

impl<K: Hash + Eq + Clone, D: Dispatch> Coalescers<K, D> {
    pub fn new(route: Route, metrics: GatewayMetrics) -> Self {
        metrics.batch_keys.with_label_values(&[D::ROUTE]).set(0);
        Self {
            route,
            metrics,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KeyMap<K, D>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entries in the map.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn publish(&self, len: usize) {
        self.metrics
            .batch_keys
            .with_label_values(&[D::ROUTE])
            .set(len as i64);
    }

    /// Sends `item` through the coalescer of (`backend`, `key`), created with `dispatch` on
    /// first use; or alone, unbatched, when the map is full of entries in use.
    pub async fn call(
        &self,
        key: K,
        model: &str,
        backend: &Arc<BackendPool>,
        dispatch: impl FnOnce() -> D,
        item: D::Item,
        deadline: Instant,
    ) -> Result<D::Output, GatewayError> {
        match self.get(key, model, backend, dispatch) {
            Ok(coalescer) => coalescer.call(item, deadline).await,
            Err(dispatch) => dispatch
                .dispatch(backend, vec![item], deadline)
                .await
                .pop()
                .unwrap_or_else(|| {
                    Err(ServeError::unavailable("backend call returned no result").into())
                }),
        }
    }

    /// The coalescer for the key, or the dispatch back when there is no room for it.
    fn get(
        &self,
        key: K,
        model: &str,
        backend: &Arc<BackendPool>,
        dispatch: impl FnOnce() -> D,
    ) -> Result<Arc<Coalescer<D>>, D> {
        let mut map = self.lock();
        let key = (backend.name.clone(), key);
        if let Some(c) = map.get(&key) {
            return Ok(c.clone());
        }
        if map.len() >= self.route.max_batch_keys {
            // The map lock is held, so a count of 1 (the map's own) means no caller, batch
            // or timer holds this entry, and none can start to.
            let unused = map
                .iter()
                .find(|(_, c)| Arc::strong_count(c) == 1)
                .map(|(k, _)| k.clone());
            match unused {
                Some(k) => {
                    map.remove(&k);
                }
                None => return Err(dispatch()),
            }
        }
        let c = Arc::new(Coalescer {
            what: model.to_string(),
            dispatch: dispatch(),
            route: self.route.clone(),
            backend: backend.clone(),
            metrics: self.metrics.clone(),
            state: Mutex::new(State {
                items: Vec::new(),
                rows: 0,
                in_flight: 0,
                timer_armed: false,
                last_used: Instant::now(),
            }),
        });
        map.insert(key, c.clone());
        self.publish(map.len());
        Ok(c)
    }

    /// Drops every entry unused for `batch_key_idle_ms`.
    pub fn sweep(&self) {
        let idle = Duration::from_millis(self.route.batch_key_idle_ms);
        let mut map = self.lock();
        map.retain(|_, c| Arc::strong_count(c) > 1 || c.lock().last_used.elapsed() < idle);
        self.publish(map.len());
    }
}

// === impl ClassifyDispatch ===

/// A caller's answer: the labels and the model version that computed them.
pub type Labelled = (Vec<Label>, String);

/// `Classify` calls of one (model, top_k) → `ClassifyBatch`.
pub struct ClassifyDispatch {
    pub model: String,
    pub top_k: u32,
}

impl Dispatch for ClassifyDispatch {
    type Item = ImageInput;
    type Output = Labelled;
    const ROUTE: &'static str = "vision.classify";

    fn rows(_: &ImageInput) -> usize {
        1
    }

    async fn dispatch(
        &self,
        backend: &BackendPool,
        items: Vec<ImageInput>,
        deadline: Instant,
    ) -> Vec<Result<Labelled, GatewayError>> {
        let (model, top_k) = (self.model.clone(), self.top_k);
        if items.len() == 1 {
            // One item: the plain call is cheaper for the backend than a batch of one.
            let image = items.into_iter().next();
            let r = backend
                .call(
                    "marquee.vision.v1.ImageService/Classify",
                    deadline,
                    |ch, t| {
                        let req = ClassifyRequest {
                            model: model.clone(),
                            image: image.clone(),
                            top_k,
                        };
                        async move {
                            ImageServiceClient::new(ch)
                                .max_decoding_message_size(MAX_BACKEND_MESSAGE)
                                .classify(outgoing(req, t))
                                .await
                        }
                    },
                )
                .await
                .map(|r| {
                    let r = r.into_inner();
                    (r.labels, r.model_version)
                });
            return vec![r];
        }
        let n = items.len();
        let result = backend
            .call(
                "marquee.vision.v1.ImageService/ClassifyBatch",
                deadline,
                |ch, t| {
                    let req = ClassifyBatchRequest {
                        model: model.clone(),
                        images: items.clone(),
                        top_k,
                    };
                    async move {
                        ImageServiceClient::new(ch)
                            .max_decoding_message_size(MAX_BACKEND_MESSAGE)
                            .classify_batch(outgoing(req, t))
                            .await
                    }
                },
            )
            .await;
        match result {
            Ok(resp) => {
                let resp = resp.into_inner();
                if resp.items.len() != n {
                    return (0..n)
                        .map(|_| {
                            Err(ServeError::unavailable("backend returned a short batch").into())
                        })
                        .collect();
                }
                resp.items
                    .into_iter()
                    .map(|item| match item.result {
                        Some(ItemResult::Classification(c)) => {
                            Ok((c.labels, resp.model_version.clone()))
                        }
                        Some(ItemResult::Error(e)) => Err(GatewayError::Backend(item_status(e))),
                        None => {
                            Err(ServeError::unavailable("backend returned an empty item").into())
                        }
                    })
                    .collect()
            }
            // A call-level failure (e.g. every replica down) fails every item of the batch.
            Err(e) => fan_out(e, n),
        }
    }
}

/// A call-level failure, for each of `n` callers: made into a status once (an internal error
/// is logged once, under one reference), then passed to each as is.
fn fan_out<T>(e: GatewayError, n: usize) -> Vec<Result<T, GatewayError>> {
    let status: Status = e.into();
    (0..n)
        .map(|_| Err(GatewayError::Backend(status.clone())))
        .collect()
}

/// The status a caller would have got calling `Classify` on its own, field renamed to the
/// single-call request (`images[i].encoded` → `image.encoded`).
fn item_status(e: marquee_proto::common::ItemError) -> Status {
    let field = match e.field.split_once('.') {
        Some((head, rest)) if head.starts_with("images[") => format!("image.{rest}"),
        _ if e.field.starts_with("images[") => "image".to_string(),
        _ => e.field.clone(),
    };
    let message = e.message.replace(&e.field, &field);
    marquee_core::error::item_status(Code::from_i32(e.code), field, message)
}

// === impl InferDispatch ===

/// What makes `ModelInfer` requests mergeable: same model, version, input name, per-row shape,
/// encoding (raw or typed FP32) and requested outputs. Every field is bounded by
/// [`InferKey::plan`] before a key exists.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InferKey {
    pub model: String,
    pub version: String,
    pub input: String,
    pub row_shape: Vec<i64>,
    pub raw: bool,
    pub outputs: Vec<String>,
}

/// A `ModelInfer` whose payload matches its declared shape. `rows` is the checked batch
/// dimension: what it adds to a merged call and what its share of the response is cut by.
#[derive(Debug)]
pub struct InferItem {
    pub req: ModelInferRequest,
    pub rows: usize,
}

/// How the gateway sends one `ModelInfer`.
#[derive(Debug)]
pub enum InferPlan {
    /// Merged with other callers' rows of the same key.
    Batch(InferKey, InferItem),
    /// On its own, unchanged: the backend judges it (several inputs, another datatype, a
    /// shape or version the gateway cannot check, parameters it does not merge).
    Alone(ModelInferRequest),
}

/// Bytes per element of the OIP datatypes with a fixed size.
fn dtype_size(datatype: &str) -> Option<usize> {
    Some(match datatype {
        "BOOL" | "UINT8" | "INT8" => 1,
        "UINT16" | "INT16" | "FP16" | "BF16" => 2,
        "UINT32" | "INT32" | "FP32" => 4,
        "UINT64" | "INT64" | "FP64" => 8,
        _ => return None,
    })
}

/// Elements per row of a shape whose leading dimension is the batch, if every dimension is
/// positive and the product fits.
fn row_elements(dims: &[i64]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| {
        usize::try_from(d)
            .ok()
            .filter(|&d| d > 0)
            .and_then(|d| acc.checked_mul(d))
    })
}

impl InferKey {
    /// Checks a request's names and payload and decides how it is sent. Refused with
    /// `INVALID_ARGUMENT`: a name over [`MAX_NAME_BYTES`] or outside visible ASCII, and a
    /// single FP32 input whose raw bytes or typed values do not match its declared shape, so
    /// a caller that lies about its rows fails alone and never shifts another caller's rows.
    /// `served_version` is the version the routing table knows for the model: another
    /// explicit version is sent alone, so clients cannot mint keys with made-up versions.
    pub fn plan(
        req: ModelInferRequest,
        route: &Route,
        served_version: Option<&str>,
    ) -> Result<InferPlan, GatewayError> {
        check_name("model_name", &req.model_name)?;
        check_name("model_version", &req.model_version)?;
        for (i, input) in req.inputs.iter().enumerate() {
            check_name(&format!("inputs[{i}].name"), &input.name)?;
        }
        for (i, output) in req.outputs.iter().enumerate() {
            check_name(&format!("outputs[{i}].name"), &output.name)?;
        }
        let [input] = req.inputs.as_slice() else {
            return Ok(InferPlan::Alone(req));
        };
        let rank = input.shape.len();
        if input.datatype != "FP32" || !(2..=MAX_BATCHED_RANK).contains(&rank) {
            return Ok(InferPlan::Alone(req));
        }
        let (Ok(rows), Some(per_row)) = (
            usize::try_from(input.shape[0]),
            row_elements(&input.shape[1..]),
        ) else {
            // A zero or negative dimension: the backend names what it expects.
            return Ok(InferPlan::Alone(req));
        };
        if rows == 0 {
            return Ok(InferPlan::Alone(req));
        }
        // The declared size is bounded before anything is sized from it: a shape declaring
        // more than a request may carry cannot match its payload.
        let limit = route.max_request_bytes;
        let elements = rows
            .checked_mul(per_row)
            .filter(|n| n.checked_mul(4).is_some_and(|b| b <= limit));
        let Some(elements) = elements else {
            return Err(ServeError::invalid(
                "inputs[0].shape",
                format!(
                    "`inputs[0].shape`: shape {:?} of FP32 needs more than {limit} bytes, the most a request may carry (`routes.inference.max_request_bytes`)",
                    input.shape
                ),
            )
            .into());
        };
        let raw = match (req.raw_input_contents.len(), &input.contents) {
            (1, None) => {
                let got = req.raw_input_contents[0].len();
                if got != elements * 4 {
                    return Err(ServeError::invalid(
                        "raw_input_contents[0]",
                        format!(
                            "`raw_input_contents[0]`: shape {:?} of FP32 needs {} bytes, got {got}",
                            input.shape,
                            elements * 4
                        ),
                    )
                    .into());
                }
                true
            }
            (0, contents) => {
                let got = contents.as_ref().map_or(0, |c| c.fp32_contents.len());
                if got != elements {
                    return Err(ServeError::invalid(
                        "inputs[0].contents.fp32_contents",
                        format!(
                            "`inputs[0].contents.fp32_contents`: shape {:?} needs {elements} values, got {got}",
                            input.shape
                        ),
                    )
                    .into());
                }
                false
            }
            // Both encodings, or several raw inputs: the backend says which is wrong.
            _ => return Ok(InferPlan::Alone(req)),
        };
        let batchable = req.parameters.is_empty()
            && input.parameters.is_empty()
            && req.outputs.len() <= MAX_BATCHED_OUTPUTS
            && req.outputs.iter().all(|o| o.parameters.is_empty())
            && (req.model_version.is_empty() || served_version == Some(&req.model_version))
            && rows <= route.max_batch;
        if !batchable {
            return Ok(InferPlan::Alone(req));
        }
        let key = Self {
            model: req.model_name.clone(),
            version: req.model_version.clone(),
            input: input.name.clone(),
            row_shape: input.shape[1..].to_vec(),
            raw,
            outputs: req.outputs.iter().map(|o| o.name.clone()).collect(),
        };
        Ok(InferPlan::Batch(key, InferItem { req, rows }))
    }
}

/// `ModelInfer` calls of one [`InferKey`] → one `ModelInfer` with the rows concatenated.
pub struct InferDispatch;

impl Dispatch for InferDispatch {
    type Item = InferItem;
    type Output = ModelInferResponse;
    const ROUTE: &'static str = "inference.model_infer";

    fn rows(item: &InferItem) -> usize {
        item.rows
    }

    async fn dispatch(
        &self,
        backend: &BackendPool,
        items: Vec<InferItem>,
        deadline: Instant,
    ) -> Vec<Result<ModelInferResponse, GatewayError>> {
        if items.len() > 1 {
            match send_infer(backend, merge(&items), deadline).await {
                Ok(resp) => {
                    if let Some(split) = split(&items, resp) {
                        return split.into_iter().map(Ok).collect();
                    }
                }
                // A problem with the request (one caller's bad data, a batch over the model's
                // limit) must not fail the others: fall through to one call each.
                Err(e) if matches!(e.code(), Code::InvalidArgument | Code::ResourceExhausted) => {}
                Err(e) => return fan_out(e, items.len()),
            }
        }
        let calls = items
            .into_iter()
            .map(|item| send_infer(backend, item.req, deadline));
        futures::future::join_all(calls).await
    }
}

/// One `ModelInfer` to the backend, unchanged.
pub async fn send_infer(
    backend: &BackendPool,
    req: ModelInferRequest,
    deadline: Instant,
) -> Result<ModelInferResponse, GatewayError> {
    backend
        .call(
            "inference.GRPCInferenceService/ModelInfer",
            deadline,
            |ch, t| {
                let req = req.clone();
                async move {
                    GrpcInferenceServiceClient::new(ch)
                        .max_decoding_message_size(MAX_BACKEND_MESSAGE)
                        .model_infer(outgoing(req, t))
                        .await
                }
            },
        )
        .await
        .map(tonic::Response::into_inner)
}

/// One request holding every item's rows, in order. Every item's payload was checked against
/// its rows by [`InferKey::plan`], so row `i` of the merge is exactly some caller's row.
fn merge(items: &[InferItem]) -> ModelInferRequest {
    let mut merged = items[0].req.clone();
    merged.id = String::new();
    let rows: usize = items.iter().map(|i| i.rows).sum();
    merged.inputs[0].shape[0] = rows as i64;
    if merged.raw_input_contents.len() == 1 {
        let mut data = Vec::with_capacity(
            items
                .iter()
                .map(|i| i.req.raw_input_contents[0].len())
                .sum(),
        );
        for i in items {
            data.extend_from_slice(&i.req.raw_input_contents[0]);
        }
        merged.raw_input_contents = vec![Bytes::from(data)];
    } else {
        let values = items
            .iter()
            .flat_map(|i| {
                i.req.inputs[0]
                    .contents
                    .as_ref()
                    .map(|c| c.fp32_contents.as_slice())
                    .unwrap_or_default()
            })
            .copied()
            .collect();
        merged.inputs[0].contents = Some(InferTensorContents {
            fp32_contents: values,
            ..Default::default()
        });
    }
    merged
}

/// Each item's share of a merged response, or `None` unless every output is exactly `total`
/// rows of its declared per-row size (then the items are sent one by one: a response that
/// does not divide is never cut at a guess, which could hand a caller another caller's rows).
fn split(items: &[InferItem], resp: ModelInferResponse) -> Option<Vec<ModelInferResponse>> {
    let total: usize = items.iter().map(|i| i.rows).sum();
    if !resp.raw_output_contents.is_empty() && resp.raw_output_contents.len() != resp.outputs.len()
    {
        return None;
    }
    let mut out: Vec<ModelInferResponse> = items
        .iter()
        .map(|i| ModelInferResponse {
            model_name: resp.model_name.clone(),
            model_version: resp.model_version.clone(),
            id: i.req.id.clone(),
            parameters: resp.parameters.clone(),
            outputs: Vec::new(),
            raw_output_contents: Vec::new(),
        })
        .collect();
    for (o, tensor) in resp.outputs.iter().enumerate() {
        if tensor.shape.first().copied() != Some(total as i64) {
            return None;
        }
        let per_row = row_elements(&tensor.shape[1..])?;
        let expected = total.checked_mul(per_row)?;
        let mut offset = 0;
        for (item, part) in items.iter().zip(out.iter_mut()) {
            let rows = item.rows;
            let mut shape = tensor.shape.clone();
            shape[0] = rows as i64;
            let contents = match &tensor.contents {
                Some(c) if c.fp32_contents.len() == expected && expected > 0 => {
                    Some(InferTensorContents {
                        fp32_contents: c.fp32_contents[offset * per_row..(offset + rows) * per_row]
                            .to_vec(),
                        ..Default::default()
                    })
                }
                Some(_) => return None,
                None => {
                    let raw = resp.raw_output_contents.get(o)?;
                    let width = per_row.checked_mul(dtype_size(&tensor.datatype)?)?;
                    if Some(raw.len()) != total.checked_mul(width) {
                        return None;
                    }
                    part.raw_output_contents
                        .push(raw.slice(offset * width..(offset + rows) * width));
                    None
                }
            };
            part.outputs.push(InferOutputTensor {
                name: tensor.name.clone(),
                datatype: tensor.datatype.clone(),
                shape,
                parameters: tensor.parameters.clone(),
                contents,
            });
            offset += rows;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use marquee_proto::inference::model_infer_request::{
        InferInputTensor, InferRequestedOutputTensor,
    };
    use tonic_types::StatusExt;

    fn req(id: &str, rows: i64, fill: u8) -> ModelInferRequest {
        ModelInferRequest {
            model_name: "m".into(),
            id: id.into(),
            inputs: vec![InferInputTensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![rows, 2],
                ..Default::default()
            }],
            raw_input_contents: vec![Bytes::from(vec![fill; rows as usize * 8])],
            ..Default::default()
        }
    }

    fn plan(r: ModelInferRequest) -> Result<InferPlan, GatewayError> {
        InferKey::plan(r, &Route::default(), Some("1"))
    }

    fn batched(r: ModelInferRequest) -> (InferKey, InferItem) {
        match plan(r).unwrap() {
            InferPlan::Batch(k, i) => (k, i),
            InferPlan::Alone(r) => panic!("not batched: {r:?}"),
        }
    }

    fn refused(r: ModelInferRequest) -> (String, String) {
        let status: Status = plan(r).unwrap_err().into();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let field = status.get_details_bad_request().unwrap().field_violations[0]
            .field
            .clone();
        (field, status.message().to_string())
    }

    fn response(rows: i64, raw: Vec<u8>) -> ModelInferResponse {
        ModelInferResponse {
            model_name: "m".into(),
            model_version: "7".into(),
            outputs: vec![InferOutputTensor {
                name: "y".into(),
                datatype: "FP32".into(),
                shape: vec![rows, 1],
                ..Default::default()
            }],
            raw_output_contents: vec![Bytes::from(raw)],
            ..Default::default()
        }
    }

    #[test]
    fn merged_rows_split_back_to_their_callers() {
        let (ka, a) = batched(req("a", 1, 1));
        let (kb, b) = batched(req("b", 2, 2));
        assert_eq!(ka, kb, "same layout, same key");
        let items = vec![a, b];
        let merged = merge(&items);
        assert_eq!(merged.inputs[0].shape, vec![3, 2]);
        assert_eq!(merged.raw_input_contents[0].len(), 24);
        // A response echoing each row's fill byte as its output.
        let resp = response(3, vec![1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2]);
        let parts = split(&items, resp).unwrap();
        assert_eq!(parts[0].id, "a");
        assert_eq!(parts[0].outputs[0].shape, vec![1, 1]);
        assert_eq!(parts[0].raw_output_contents[0].as_ref(), &[1, 1, 1, 1]);
        assert_eq!(parts[1].outputs[0].shape, vec![2, 1]);
        assert_eq!(parts[1].raw_output_contents[0].as_ref(), &[2; 8]);
        assert_eq!(parts[1].model_version, "7");
    }

    #[test]
    fn a_response_that_does_not_divide_is_never_cut() {
        let items = vec![batched(req("a", 1, 1)).1, batched(req("b", 2, 2)).1];
        // 3 rows of one FP32 each need 12 bytes: 13, 9 or a wrong leading dimension are
        // refused rather than cut at a guess.
        assert!(split(&items, response(3, vec![0; 13])).is_none());
        assert!(split(&items, response(3, vec![0; 9])).is_none());
        assert!(split(&items, response(2, vec![0; 8])).is_none());
        let mut missing = response(3, vec![0; 12]);
        missing.raw_output_contents.clear();
        assert!(split(&items, missing).is_none());
    }

    #[test]
    fn payloads_that_do_not_match_their_shape_are_refused() {
        let mut empty = req("a", 1, 0);
        empty.raw_input_contents[0] = Bytes::new();
        let (field, message) = refused(empty);
        assert_eq!(field, "raw_input_contents[0]");
        assert!(message.contains("needs 8 bytes, got 0"), "{message}");
        let mut long = req("a", 1, 0);
        long.raw_input_contents[0] = Bytes::from(vec![0; 16]);
        assert!(refused(long).1.contains("got 16"));
        let mut typed = req("a", 2, 0);
        typed.raw_input_contents.clear();
        typed.inputs[0].contents = Some(InferTensorContents {
            fp32_contents: vec![1.0; 3],
            ..Default::default()
        });
        let (field, message) = refused(typed);
        assert_eq!(field, "inputs[0].contents.fp32_contents");
        assert!(message.contains("needs 4 values, got 3"), "{message}");
        // Dimensions whose product overflows, or exceeds what a request may carry.
        let mut huge = req("a", 1, 0);
        huge.inputs[0].shape = vec![i64::MAX, i64::MAX, 2];
        assert_eq!(refused(huge).0, "inputs[0].shape");
        let mut big = req("a", 1, 0);
        big.inputs[0].shape = vec![1 << 20, 1 << 20];
        assert_eq!(refused(big).0, "inputs[0].shape");
    }

    #[test]
    fn oversized_names_are_refused_and_unusual_keys_go_alone() {
        let mut version = req("a", 1, 0);
        version.model_version = "9".repeat(MAX_NAME_BYTES + 1);
        assert_eq!(refused(version).0, "model_version");
        let mut output = req("a", 1, 0);
        output.outputs = vec![InferRequestedOutputTensor {
            name: "y\n".into(),
            ..Default::default()
        }];
        assert_eq!(refused(output).0, "outputs[0].name");
        let mut other_version = req("a", 1, 0);
        other_version.model_version = "2".into();
        assert!(matches!(plan(other_version), Ok(InferPlan::Alone(_))));
        let mut served = req("a", 1, 0);
        served.model_version = "1".into();
        assert!(matches!(plan(served), Ok(InferPlan::Batch(..))));
        let mut outputs = req("a", 1, 0);
        outputs.outputs = (0..=MAX_BATCHED_OUTPUTS)
            .map(|i| InferRequestedOutputTensor {
                name: format!("o{i}"),
                ..Default::default()
            })
            .collect();
        assert!(matches!(plan(outputs), Ok(InferPlan::Alone(_))));
    }

    #[test]
    fn requests_that_cannot_merge_go_alone() {
        let mut two_inputs = req("a", 1, 0);
        two_inputs.inputs.push(two_inputs.inputs[0].clone());
        assert!(matches!(plan(two_inputs), Ok(InferPlan::Alone(_))));
        let mut int8 = req("a", 1, 0);
        int8.inputs[0].datatype = "INT8".into();
        assert!(matches!(plan(int8), Ok(InferPlan::Alone(_))));
        let mut other_shape = req("a", 1, 0);
        other_shape.inputs[0].shape = vec![1, 1, 2];
        assert_ne!(batched(other_shape).0, batched(req("b", 1, 0)).0);
    }
}
