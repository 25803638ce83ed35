//! gRPC handlers: `marquee.language.v1.TextGeneration` and the Open Inference Protocol (raw
//! logits by full recompute). Handlers validate, tokenize and hand work to the engine; they
//! never run the model themselves.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures::Stream;
use marquee_core::ServeError;
use marquee_core::config::ServerSettings;
use marquee_core::deadline::deadline;
use marquee_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use marquee_proto::inference::model_infer_response::InferOutputTensor;
use marquee_proto::inference::model_metadata_response::TensorMetadata;
use marquee_proto::inference::*;
use marquee_proto::language::text_generation_server::TextGeneration;
use marquee_proto::language::{
    FinishReason, GenerateRequest, GenerateResponse, GenerateStreamResponse, GenerationSummary,
    Token, TokenizeRequest, TokenizeResponse,
};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::engine::{Engine, Event, Finish, Job, Summary};
use crate::model::Vocab;
use crate::validate::{self, Limits};

/// The language service's state, shared by its gRPC services.
pub struct Language {
    pub engine: Arc<Engine>,
    pub vocab: Arc<Vocab>,
    pub model: String,
    pub version: u64,
    pub bos: u32,
    pub limits: Limits,
    pub server: ServerSettings,
    pub max_prompt_bytes: usize,
    seeds: AtomicU64,
}

impl Language {
    #[allow(clippy::too_many_arguments)] // one constructor call, in `start`
    pub fn new(
        engine: Arc<Engine>,
        vocab: Arc<Vocab>,
        model: String,
        version: u64,
        bos: u32,
        limits: Limits,
        server: ServerSettings,
        max_prompt_bytes: usize,
    ) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self {
            engine,
            vocab,
            model,
            version,
            bos,
            limits,
            server,
            max_prompt_bytes,
            seeds: AtomicU64::new(now),
        }
    }

    fn check_model(&self, name: &str) -> Result<(), ServeError> {
        if name.is_empty() || name == self.model {
            Ok(())
        } else {
            Err(ServeError::ModelNotFound {
                model: name.to_owned(),
                detail: format!("; this service serves `{}`", self.model),
            })
        }
    }

    /// A fresh seed for requests that set none: distinct per request, reported back.
    fn fresh_seed(&self) -> u64 {
        let mut r = crate::sampling::Rng::new(self.seeds.fetch_add(1, Ordering::Relaxed));
        r.next_u64()
    }

    /// Validates and tokenizes a request and queues it.
    fn submit(
        &self,
        req: &GenerateRequest,
        deadline: Instant,
    ) -> Result<mpsc::Receiver<Event>, ServeError> {
        self.check_model(&req.model)?;
        if req.prompt.is_empty() {
            return Err(ServeError::invalid("prompt", "`prompt` must not be empty"));
        }
        if req.prompt.len() > self.max_prompt_bytes {
            return Err(ServeError::TooLarge {
                field: "prompt".into(),
                message: format!(
                    "`prompt` is {} bytes; at most {} (`language.max_prompt_bytes`)",
                    req.prompt.len(),
                    self.max_prompt_bytes
                ),
            });
        }
        let params =
            validate::parameters(req.parameters.as_ref(), &self.limits, self.fresh_seed())?;
        let mut prompt = vec![self.bos];
        prompt.extend(
            self.vocab
                .encode(&req.prompt)
                .map_err(|e| ServeError::Internal(e.to_string()))?
                .into_iter()
                .map(|(id, _)| id),
        );
        validate::lengths(prompt.len(), params.max_new_tokens, &self.limits)?;
        let (tx, rx) = mpsc::channel(Job::channel_capacity(&params));
        self.engine.submit(Job {
            prompt,
            params,
            events: tx,
            arrived: Instant::now(),
            deadline,
        })?;
        Ok(rx)
    }
}

fn summary(s: &Summary) -> GenerationSummary {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    GenerationSummary {
        finish_reason: match s.finish {
            Finish::Length => FinishReason::Length,
            Finish::Stop => FinishReason::Stop,
            Finish::Eos => FinishReason::Eos,
        } as i32,
        prompt_tokens: s.prompt_tokens as u32,
        generated_tokens: s.generated_tokens as u32,
        seed: s.seed,
        queue_ms: ms(s.queue),
        time_to_first_token_ms: ms(s.time_to_first_token),
        total_ms: ms(s.total),
        mean_inter_token_ms: ms(s.mean_inter_token),
    }
}

type GenerateStreamBox =
    Pin<Box<dyn Stream<Item = Result<GenerateStreamResponse, Status>> + Send + 'static>>;

/// `marquee.language.v1.TextGeneration` over the shared state.
pub struct TextApi(pub Arc<Language>);

impl std::ops::Deref for TextApi {
    type Target = Language;
    fn deref(&self) -> &Language {
        &self.0
    }
}

#[tonic::async_trait]
impl TextGeneration for TextApi {
    async fn generate(
        &self,
        req: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let deadline = deadline(req.metadata(), &self.server);
        let req = req.into_inner();
        let mut rx = self.submit(&req, deadline)?;
        let mut out = GenerateResponse {
            model: self.model.clone(),
            ..Default::default()
        };
        while let Some(event) = rx.recv().await {
            match event {
                Event::Tokens {
                    text,
                    ids,
                    logprobs,
                } => {
                    out.text.push_str(&text);
                    out.token_ids.extend(ids);
                    out.logprobs.extend(logprobs);
                }
                Event::Finished(s) => {
                    out.summary = Some(summary(&s));
                    return Ok(Response::new(out));
                }
                Event::Failed(e) => return Err(e.into()),
            }
        }
        Err(ServeError::Internal("the engine dropped a request without an answer".into()).into())
    }

    type GenerateStreamStream = GenerateStreamBox;

    async fn generate_stream(
        &self,
        req: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let deadline = deadline(req.metadata(), &self.server);
        let req = req.into_inner();
        let rx = self.submit(&req, deadline)?;
        // Dropping this stream (client cancel) drops `rx`; the engine sees the closed channel
        // and frees the sequence's slot at its next step.
        // A message per token while the client keeps up; when it falls behind, the tokens that
        // queued up meanwhile go out as one message (fewer frames, same text and ids), so a
        // slow reader costs the server less instead of more.
        let stream = futures::stream::unfold(
            (rx, None::<Event>, false),
            |(mut rx, held, done)| async move {
                if done {
                    return None;
                }
                let first = match held {
                    Some(e) => e,
                    None => rx.recv().await?,
                };
                match first {
                    Event::Tokens {
                        mut text,
                        mut ids,
                        mut logprobs,
                    } => {
                        let mut next = None;
                        while let Ok(e) = rx.try_recv() {
                            match e {
                                Event::Tokens {
                                    text: t,
                                    ids: i,
                                    logprobs: l,
                                } => {
                                    text.push_str(&t);
                                    ids.extend(i);
                                    logprobs.extend(l);
                                }
                                other => {
                                    next = Some(other);
                                    break;
                                }
                            }
                        }
                        let msg = GenerateStreamResponse {
                            text,
                            token_ids: ids,
                            logprobs,
                            summary: None,
                        };
                        Some((Ok(msg), (rx, next, false)))
                    }
                    Event::Finished(s) => Some((
                        Ok(GenerateStreamResponse {
                            summary: Some(summary(&s)),
                            ..Default::default()
                        }),
                        (rx, None, true),
                    )),
                    Event::Failed(e) => Some((Err(e.into()), (rx, None, true))),
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn tokenize(
        &self,
        req: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        let req = req.into_inner();
        self.check_model(&req.model)?;
        if req.text.len() > self.max_prompt_bytes {
            return Err(ServeError::TooLarge {
                field: "text".into(),
                message: format!(
                    "`text` is {} bytes; at most {} (`language.max_prompt_bytes`)",
                    req.text.len(),
                    self.max_prompt_bytes
                ),
            }
            .into());
        }
        let tokens = self
            .vocab
            .encode(&req.text)
            .map_err(|e| ServeError::Internal(e.to_string()))?
            .into_iter()
            .map(|(id, (start, end))| Token {
                id,
                text: String::from_utf8_lossy(self.vocab.bytes(id)).into_owned(),
                start: start as u32,
                end: end as u32,
            })
            .collect();
        Ok(Response::new(TokenizeResponse { tokens }))
    }
}

/// The Open Inference Protocol for the language model: input `input_ids` (INT64,
/// `[batch, tokens]`), output `logits` (FP32, `[batch, tokens, vocab]`), computed by full
/// recompute, without the KV cache.
pub struct LanguageOip(pub Arc<Language>);

const INPUT: &str = "input_ids";
const OUTPUT: &str = "logits";
/// Rows per OIP request: full-recompute logits are `batch x tokens x vocab` floats.
const OIP_MAX_BATCH: usize = 8;

impl LanguageOip {
    fn metadata(&self) -> ModelMetadataResponse {
        let l = &self.0;
        ModelMetadataResponse {
            name: l.model.clone(),
            versions: vec![l.version.to_string()],
            platform: "pytorch_torchscript".into(),
            inputs: vec![TensorMetadata {
                name: INPUT.into(),
                datatype: "INT64".into(),
                shape: vec![-1, -1],
            }],
            outputs: vec![TensorMetadata {
                name: OUTPUT.into(),
                datatype: "FP32".into(),
                shape: vec![-1, -1, l.engine.shape.vocab as i64],
            }],
        }
    }

    fn check(&self, name: &str, version: &str) -> Result<(), ServeError> {
        self.0.check_model(name)?;
        if name.is_empty() {
            return Err(ServeError::invalid(
                "model_name",
                format!(
                    "`model_name` must be set; this service serves `{}`",
                    self.0.model
                ),
            ));
        }
        if !version.is_empty() && version != self.0.version.to_string() {
            return Err(ServeError::ModelNotFound {
                model: format!("{name}:{version}"),
                detail: format!("; the served version is {}", self.0.version),
            });
        }
        Ok(())
    }

    fn ids(&self, req: &ModelInferRequest) -> Result<(Vec<i64>, usize, usize), ServeError> {
        let [input] = req.inputs.as_slice() else {
            return Err(ServeError::invalid(
                "inputs",
                format!(
                    "`inputs`: model `{}` takes exactly 1 input (`{INPUT}`), got {}",
                    self.0.model,
                    req.inputs.len()
                ),
            ));
        };
        if input.name != INPUT || input.datatype != "INT64" {
            return Err(ServeError::invalid(
                "inputs[0]",
                format!(
                    "`inputs[0]` must be `{INPUT}` of datatype INT64, got `{}` of {}",
                    input.name, input.datatype
                ),
            ));
        }
        let ctx = self.0.limits.context_length;
        let shape_ok = input.shape.len() == 2
            && (1..=OIP_MAX_BATCH as i64).contains(&input.shape[0])
            && (1..=ctx as i64).contains(&input.shape[1]);
        if !shape_ok {
            return Err(ServeError::invalid(
                "inputs[0].shape",
                format!(
                    "`inputs[0].shape` must be [batch, tokens] with batch in 1..={OIP_MAX_BATCH} and tokens in 1..={ctx}, got {:?}",
                    input.shape
                ),
            ));
        }
        let (batch, len) = (input.shape[0] as usize, input.shape[1] as usize);
        let budget = self.0.engine.oip_max_tokens();
        if batch * len > budget {
            return Err(ServeError::invalid(
                "inputs[0].shape",
                format!(
                    "`inputs[0].shape` {:?} asks for {} token positions; at most {budget} per request (`language.oip_max_tokens_per_step`)",
                    input.shape,
                    batch * len
                ),
            ));
        }
        let ids: Vec<i64> = if let Some(raw) = req.raw_input_contents.first() {
            if raw.len() != batch * len * 8 {
                return Err(ServeError::invalid(
                    "raw_input_contents[0]",
                    format!(
                        "`raw_input_contents[0]` must hold {} bytes (INT64 x {batch} x {len}), got {}",
                        batch * len * 8,
                        raw.len()
                    ),
                ));
            }
            raw.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect()
        } else {
            input
                .contents
                .as_ref()
                .map(|c| c.int64_contents.clone())
                .unwrap_or_default()
        };
        if ids.len() != batch * len {
            return Err(ServeError::invalid(
                "inputs[0].contents",
                format!(
                    "`inputs[0].contents.int64_contents` must hold {} values for shape {:?}, got {}",
                    batch * len,
                    input.shape,
                    ids.len()
                ),
            ));
        }
        let vocab = self.0.engine.shape.vocab as i64;
        if let Some(bad) = ids.iter().find(|&&t| t < 0 || t >= vocab) {
            return Err(ServeError::invalid(
                "inputs[0].contents",
                format!("token ids must be in 0..{vocab}, got {bad}"),
            ));
        }
        Ok((ids, batch, len))
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for LanguageOip {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse {
            live: self.0.engine.is_alive(),
        }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.0.engine.is_serving(),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let req = req.into_inner();
        Ok(Response::new(ModelReadyResponse {
            ready: self.0.engine.is_serving() && self.check(&req.name, &req.version).is_ok(),
        }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: crate::NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let req = req.into_inner();
        self.check(&req.name, &req.version)?;
        Ok(Response::new(self.metadata()))
    }

    async fn repository_index(
        &self,
        _: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        Ok(Response::new(RepositoryIndexResponse {
            models: vec![repository_index_response::ModelIndex {
                name: self.0.model.clone(),
                version: self.0.version.to_string(),
                state: "READY".into(),
                reason: String::new(),
            }],
        }))
    }

    async fn model_infer(
        &self,
        req: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let deadline = deadline(req.metadata(), &self.0.server);
        let req = req.into_inner();
        self.check(&req.model_name, &req.model_version)?;
        let (ids, batch, len) = self.ids(&req)?;
        let logits = self.0.engine.forward(ids, batch, len, deadline).await?;
        let vocab = self.0.engine.shape.vocab as i64;
        let raw = !req.raw_input_contents.is_empty();
        let (contents, raw_output_contents) = if raw {
            let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
            (None, vec![bytes.into()])
        } else {
            (
                Some(InferTensorContents {
                    fp32_contents: logits,
                    ..Default::default()
                }),
                Vec::new(),
            )
        };
        Ok(Response::new(ModelInferResponse {
            model_name: self.0.model.clone(),
            model_version: self.0.version.to_string(),
            id: req.id,
            parameters: Default::default(),
            outputs: vec![InferOutputTensor {
                name: OUTPUT.into(),
                datatype: "FP32".into(),
                shape: vec![batch as i64, len as i64, vocab],
                parameters: Default::default(),
                contents,
            }],
            raw_output_contents,
        }))
    }
}
