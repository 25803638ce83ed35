//! Cross-client batching: single-item calls for the same model from any number of clients are
//! coalesced into one batched backend call: `Classify` → `ClassifyBatch`, and OIP `ModelInfer`
//! requests with the same input layout → one `ModelInfer` whose batch dimension is their sum.
//!
//! A batch goes out at once whenever fewer than `max_batches_in_flight` batch calls are
//! running, so a lone call never waits; while the backend is busy, items accumulate and go out
//! together when a call returns, when `max_batch` rows are waiting, or after
//! `max_batch_delay_us`. Each caller gets exactly its own result, and a bad item fails only its
//! own call.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use marquee_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use marquee_proto::inference::model_infer_response::InferOutputTensor;
use marquee_proto::inference::{InferTensorContents, ModelInferRequest, ModelInferResponse};
use marquee_proto::vision::classify_batch_item::Result as ItemResult;
use marquee_proto::vision::image_service_client::ImageServiceClient;
use marquee_proto::vision::{ClassifyBatchRequest, ClassifyRequest, ImageInput, Label};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use tokio::sync::oneshot;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::backend::{BackendPool, outgoing};
use crate::config::Route;
use crate::error::GatewayError;
use crate::metrics::GatewayMetrics;

/// Backend responses can be as large as a request is allowed to be.
const MAX_BACKEND_MESSAGE: usize = 64 << 20;

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
}

/// The coalescer of one batch key (model and call shape).
pub struct Coalescer<D: Dispatch> {
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
            Ok(Err(_)) => Err(GatewayError::Unavailable("batch was dropped".into())),
            Err(_) => Err(marquee_core::ServeError::DeadlineExceeded(format!(
                "deadline expired waiting for {} through the gateway",
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

/// Every coalescer of one kind, by key.
pub struct Coalescers<K, D: Dispatch> {
    route: Route,
    metrics: GatewayMetrics,
    map: Mutex<HashMap<K, Arc<Coalescer<D>>>>,
}

impl<K: Hash + Eq + Clone + std::fmt::Debug, D: Dispatch> Coalescers<K, D> {
    pub fn new(route: Route, metrics: GatewayMetrics) -> Self {
        Self {
            route,
            metrics,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The coalescer for `key`, created with `dispatch` on first use.
    pub fn get(
        &self,
        key: K,
        backend: &Arc<BackendPool>,
        dispatch: impl FnOnce() -> D,
    ) -> Arc<Coalescer<D>> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Coalescer {
                    what: format!("{key:?}"),
                    dispatch: dispatch(),
                    route: self.route.clone(),
                    backend: backend.clone(),
                    metrics: self.metrics.clone(),
                    state: Mutex::new(State {
                        items: Vec::new(),
                        rows: 0,
                        in_flight: 0,
                        timer_armed: false,
                    }),
                })
            })
            .clone()
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
                            Err(GatewayError::Unavailable(
                                "backend returned a short batch".into(),
                            ))
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
                        None => Err(GatewayError::Unavailable(
                            "backend returned an empty item".into(),
                        )),
                    })
                    .collect()
            }
            // A call-level failure (e.g. every replica down) fails every item of the batch.
            Err(e) => fan_out(e, n),
        }
    }
}

fn fan_out<T>(e: GatewayError, n: usize) -> Vec<Result<T, GatewayError>> {
    let status: Status = e.into();
    (0..n)
        .map(|_| {
            Err(GatewayError::Backend(Status::new(
                status.code(),
                status.message().to_string(),
            )))
        })
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
    let code = Code::from_i32(e.code);
    if field.is_empty() {
        Status::new(code, message)
    } else {
        Status::with_error_details(
            code,
            message.clone(),
            ErrorDetails::with_bad_request_violation(field, message),
        )
    }
}

// === impl InferDispatch ===

/// What makes `ModelInfer` requests mergeable: same model, version, input name, datatype,
/// per-row shape, encoding (raw or typed FP32) and requested outputs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InferKey {
    pub model: String,
    pub version: String,
    pub input: String,
    pub datatype: String,
    pub row_shape: Vec<i64>,
    pub raw: bool,
    pub outputs: Vec<String>,
}

impl InferKey {
    /// The key of a request that can be merged (one input, FP32, a batch dimension, and its
    /// data where the key says), or `None` for requests that go through unchanged.
    pub fn of(req: &ModelInferRequest) -> Option<Self> {
        let [input] = req.inputs.as_slice() else {
            return None;
        };
        if input.datatype != "FP32"
            || input.shape.len() < 2
            || input.shape[0] < 1
            || !input.parameters.is_empty()
            || !req.parameters.is_empty()
        {
            return None;
        }
        let raw = match (req.raw_input_contents.len(), &input.contents) {
            (1, None) => true,
            (0, Some(c)) if !c.fp32_contents.is_empty() => false,
            _ => return None,
        };
        Some(Self {
            model: req.model_name.clone(),
            version: req.model_version.clone(),
            input: input.name.clone(),
            datatype: input.datatype.clone(),
            row_shape: input.shape[1..].to_vec(),
            raw,
            outputs: req.outputs.iter().map(|o| o.name.clone()).collect(),
        })
    }
}

/// `ModelInfer` calls of one [`InferKey`] → one `ModelInfer` with the rows concatenated.
pub struct InferDispatch;

impl Dispatch for InferDispatch {
    type Item = ModelInferRequest;
    type Output = ModelInferResponse;
    const ROUTE: &'static str = "inference.model_infer";

    fn rows(item: &ModelInferRequest) -> usize {
        item.inputs[0].shape[0] as usize
    }

    async fn dispatch(
        &self,
        backend: &BackendPool,
        items: Vec<ModelInferRequest>,
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
            .map(|req| send_infer(backend, req, deadline));
        futures::future::join_all(calls).await
    }
}

async fn send_infer(
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

/// One request holding every item's rows, in order.
fn merge(items: &[ModelInferRequest]) -> ModelInferRequest {
    let mut merged = items[0].clone();
    merged.id = String::new();
    let rows: i64 = items.iter().map(|r| r.inputs[0].shape[0]).sum();
    merged.inputs[0].shape[0] = rows;
    if merged.raw_input_contents.len() == 1 {
        let mut data =
            Vec::with_capacity(items.iter().map(|r| r.raw_input_contents[0].len()).sum());
        for r in items {
            data.extend_from_slice(&r.raw_input_contents[0]);
        }
        merged.raw_input_contents = vec![Bytes::from(data)];
    } else {
        let values = items
            .iter()
            .flat_map(|r| {
                r.inputs[0]
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

/// Each item's share of a merged response, or `None` if the response does not divide evenly
/// (then the items are sent one by one).
fn split(items: &[ModelInferRequest], resp: ModelInferResponse) -> Option<Vec<ModelInferResponse>> {
    let total: usize = items.iter().map(InferDispatch::rows).sum();
    let mut out: Vec<ModelInferResponse> = items
        .iter()
        .map(|r| ModelInferResponse {
            model_name: resp.model_name.clone(),
            model_version: resp.model_version.clone(),
            id: r.id.clone(),
            parameters: resp.parameters.clone(),
            outputs: Vec::new(),
            raw_output_contents: Vec::new(),
        })
        .collect();
    for (o, tensor) in resp.outputs.iter().enumerate() {
        if tensor.shape.first().copied() != Some(total as i64) {
            return None;
        }
        let mut offset = 0;
        for (item, part) in items.iter().zip(out.iter_mut()) {
            let rows = InferDispatch::rows(item);
            let mut shape = tensor.shape.clone();
            shape[0] = rows as i64;
            let contents = match &tensor.contents {
                Some(c) if !c.fp32_contents.is_empty() => {
                    let per_row = c.fp32_contents.len() / total;
                    if per_row * total != c.fp32_contents.len() {
                        return None;
                    }
                    Some(InferTensorContents {
                        fp32_contents: c.fp32_contents[offset * per_row..(offset + rows) * per_row]
                            .to_vec(),
                        ..Default::default()
                    })
                }
                Some(_) => return None,
                None => {
                    let raw = resp.raw_output_contents.get(o)?;
                    let per_row = raw.len() / total;
                    if per_row * total != raw.len() {
                        return None;
                    }
                    part.raw_output_contents
                        .push(raw.slice(offset * per_row..(offset + rows) * per_row));
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
    use marquee_proto::inference::model_infer_request::InferInputTensor;

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

    #[test]
    fn merged_rows_split_back_to_their_callers() {
        let items = vec![req("a", 1, 1), req("b", 2, 2)];
        assert_eq!(
            InferKey::of(&items[0]),
            InferKey::of(&items[1]),
            "same layout, same key"
        );
        let merged = merge(&items);
        assert_eq!(merged.inputs[0].shape, vec![3, 2]);
        assert_eq!(merged.raw_input_contents[0].len(), 24);
        // A response echoing each row's fill byte as its output.
        let resp = ModelInferResponse {
            model_name: "m".into(),
            model_version: "7".into(),
            outputs: vec![InferOutputTensor {
                name: "y".into(),
                datatype: "FP32".into(),
                shape: vec![3, 1],
                ..Default::default()
            }],
            raw_output_contents: vec![Bytes::from(vec![1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2])],
            ..Default::default()
        };
        let parts = split(&items, resp).unwrap();
        assert_eq!(parts[0].id, "a");
        assert_eq!(parts[0].outputs[0].shape, vec![1, 1]);
        assert_eq!(parts[0].raw_output_contents[0].as_ref(), &[1, 1, 1, 1]);
        assert_eq!(parts[1].outputs[0].shape, vec![2, 1]);
        assert_eq!(parts[1].raw_output_contents[0].as_ref(), &[2; 8]);
        assert_eq!(parts[1].model_version, "7");
    }

    #[test]
    fn requests_that_cannot_merge_have_no_key() {
        let mut two_inputs = req("a", 1, 0);
        two_inputs.inputs.push(two_inputs.inputs[0].clone());
        assert!(InferKey::of(&two_inputs).is_none());
        let mut int8 = req("a", 1, 0);
        int8.inputs[0].datatype = "INT8".into();
        assert!(InferKey::of(&int8).is_none());
        let mut other_shape = req("a", 1, 0);
        other_shape.inputs[0].shape = vec![1, 3];
        assert_ne!(InferKey::of(&other_shape), InferKey::of(&req("b", 1, 0)));
    }
}
