//! Logs and traces (spec/ops.md OPS-LOG-*, OPS-TRACE-*): the `tracing`
//! subscriber every `blyan` command installs.
//!
//! - **OPS-LOG-1** Two formats: `text` (human, the default) and `json` (one
//!   JSON object per line: `timestamp`, `level`, `target`, `node`, `span`,
//!   `message` and the event's other fields under `fields`), for ELK.
//! - **OPS-LOG-2** Every line a node's work logs names the node: a node's
//!   tasks and threads run inside the [`NODE_SPAN`] span, whose `node` field
//!   is the node's address prefix ([`node_label`]); the text format shows it
//!   as `node{node=0x…}:`, the JSON format as the `node` key.
//! - **OPS-LOG-3** Levels per module: `--log` takes `tracing-subscriber`
//!   `EnvFilter` directives (`info,blyan_runtime::transport=debug`); without
//!   it `RUST_LOG`, else `BLYAN_LOG` (one level), else the command's default.
//! - **OPS-LOG-4** Secrets are never logged: the API logs no request headers
//!   (`Authorization` carries API keys), key passwords never reach a log
//!   call, and the devnet's banner (test password, API key) is stdout output
//!   of the command, not a log line.
//! - **OPS-TRACE-1** With an OTLP endpoint configured (`--otlp-endpoint` or
//!   `[telemetry] otlp_endpoint`), spans go to it over OTLP/gRPC through
//!   `opentelemetry-otlp` (batched, on its own thread); without one no
//!   OpenTelemetry layer is installed at all (OPS-TRACE-2: off costs
//!   nothing beyond the spans the logs already carry).
//! - **OPS-TRACE-3** The spans: `POST /chat` etc. (one per API request,
//!   `http.request`), `inference.route` (the routing decision: today always
//!   the local engine), `inference.job` (queue and engine), `engine.generate`
//!   on the engine's thread and `stage` per pipeline stage the engine runs
//!   (the local engine runs one stage over every layer), and for
//!   transactions `tx.submit` → `mempool.admit` (on the node's thread) →
//!   `tx.commit` when a block including it commits (a child of the
//!   submission's span, recorded at commit with its finality).

use crate::Error;
use blyan_state_machine::types::Address;
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use std::fmt;
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, filter_fn};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// The span every task and thread of a node runs in (OPS-LOG-2).
pub const NODE_SPAN: &str = "node";

/// The `node` field of [`NODE_SPAN`]: `0x` and the address's first 8 hex digits.
pub fn node_label(address: &Address) -> String {
    let full = address.to_string();
    full.chars().take(10).collect()
}

/// The span a node's work runs in.
pub fn node_span(address: &Address) -> tracing::Span {
    tracing::info_span!(NODE_SPAN, node = %node_label(address))
}

/// Log line format (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// How to set up logs and traces.
#[derive(Clone, Debug)]
pub struct TelemetryOptions {
    pub format: LogFormat,
    /// `EnvFilter` directives (`--log`); `None`: `RUST_LOG`, else `BLYAN_LOG`.
    pub directives: Option<String>,
    /// The level when nothing else says.
    pub default_level: tracing::Level,
    /// `http://host:4317`: export spans over OTLP/gRPC; `None`: no tracing.
    pub otlp_endpoint: Option<String>,
    /// OpenTelemetry `service.name`.
    pub service_name: String,
}

impl TelemetryOptions {
    pub fn new(default_level: tracing::Level) -> TelemetryOptions {
        TelemetryOptions {
            format: LogFormat::Text,
            directives: None,
            default_level,
            otlp_endpoint: None,
            service_name: "blyan".into(),
        }
    }
}

/// The log filter (OPS-LOG-3): `directives`, else `RUST_LOG`, else
/// `BLYAN_LOG`, else `default_level`; a directive that does not parse is an
/// error naming where it came from.
pub fn log_filter(
    directives: Option<&str>,
    default_level: tracing::Level,
) -> Result<EnvFilter, Error> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let (source, text) = match (directives, env("RUST_LOG"), env("BLYAN_LOG")) {
        (Some(d), _, _) => ("--log", d.to_string()),
        (None, Some(r), _) => ("RUST_LOG", r),
        (None, None, Some(b)) => ("BLYAN_LOG", b),
        (None, None, None) => return Ok(EnvFilter::new(default_level.as_str())),
    };
    EnvFilter::builder()
        .with_default_directive(LevelFilter::from_level(default_level).into())
        .parse(&text)
        .map_err(|e| {
            Error::Config(format!(
                "{source} {text:?} is not a log filter (e.g. `info,blyan_runtime::transport=debug`): {e}"
            ))
        })
}

/// Flushes and stops the span exporter when dropped.
#[must_use = "dropping it stops the span exporter"]
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn tracing(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("span exporter shutdown: {e}");
        }
    }
}

/// Installs the global subscriber. Call from within a tokio runtime (the
/// OTLP exporter's gRPC channel lives on it).
pub fn init(opts: &TelemetryOptions) -> Result<Telemetry, Error> {
    let filter = log_filter(opts.directives.as_deref(), opts.default_level)?;
    let fmt_layer: BoxedLayer = match opts.format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines)
            .with_filter(filter)
            .boxed(),
    };
    let mut layers = vec![fmt_layer];
    let mut provider = None;
    if let Some(endpoint) = &opts.otlp_endpoint {
        let (layer, p) = otel_layer(endpoint, &opts.service_name)?;
        layers.push(layer);
        provider = Some(p);
    }
    tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .map_err(|e| Error::Config(format!("log subscriber: {e}")))?;
    Ok(Telemetry { provider })
}

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// OPS-TRACE-1: the OpenTelemetry layer exporting to `endpoint`. It sees the
/// runtime's spans at info and above, never [`NODE_SPAN`] (which lives as
/// long as the node: each API request is a trace of its own).
fn otel_layer(
    endpoint: &str,
    service_name: &str,
) -> Result<(BoxedLayer, opentelemetry_sdk::trace::SdkTracerProvider), Error> {
    use opentelemetry_otlp::WithExportConfig;
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(Error::Config(format!(
            "OTLP endpoint {endpoint:?} must be an http:// URL (OTLP/gRPC, e.g. http://127.0.0.1:4317)"
        )));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| Error::Config(format!("OTLP exporter for {endpoint}: {e}")))?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service_name.to_string())
                .build(),
        )
        .build();
    let tracer = provider.tracer("blyan");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_threads(false)
        .with_filter(filter_fn(|m| {
            m.target().starts_with("blyan")
                && *m.level() <= tracing::Level::INFO
                && !(m.is_span() && m.name() == NODE_SPAN)
        }))
        .boxed();
    Ok((layer, provider))
}

/// A link from a span to work that continues elsewhere (another thread, a
/// later block): the span's OpenTelemetry context when spans are exported,
/// nothing otherwise (OPS-TRACE-2).
#[derive(Clone, Debug, Default)]
pub struct TraceLink(Option<SpanContext>);

impl TraceLink {
    /// The current span's context, if it is exported.
    pub fn current() -> TraceLink {
        let cx = tracing::Span::current().context();
        let sc = cx.span().span_context().clone();
        TraceLink(sc.is_valid().then_some(sc))
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// Makes `span` (not yet entered) a child of the linked span.
    pub fn adopt(&self, span: &tracing::Span) {
        if let Some(sc) = &self.0 {
            let cx = opentelemetry::Context::new().with_remote_span_context(sc.clone());
            let _ = span.set_parent(cx);
        }
    }
}

/// The axum middleware that opens one span per API request (OPS-TRACE-3),
/// named `METHOD /route` for OpenTelemetry. It records the method, the
/// matched route and the status, never headers (OPS-LOG-4).
pub async fn request_span(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument;
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| req.uri().path().to_string(), |m| m.as_str().to_string());
    let span = tracing::info_span!(
        "http.request",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
    );
    let response = next.run(req).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    response
}

/// OPS-LOG-1/2: one JSON object per line with the node named at the top.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        use serde_json::{Map, Value};
        let mut time = String::new();
        SystemTime.format_time(&mut Writer::new(&mut time))?;
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert("timestamp".into(), Value::String(time));
        line.insert("level".into(), Value::String(meta.level().to_string()));
        line.insert("target".into(), Value::String(meta.target().into()));
        let mut spans = Vec::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                let fields = ext
                    .get::<FormattedFields<N>>()
                    .and_then(|f| serde_json::from_str::<Map<String, Value>>(f).ok())
                    .unwrap_or_default();
                if span.name() == NODE_SPAN {
                    if let Some(n) = fields.get("node") {
                        line.insert("node".into(), n.clone());
                    }
                } else {
                    spans.push(Value::String(span.name().into()));
                }
            }
        }
        if !spans.is_empty() {
            line.insert("spans".into(), Value::Array(spans));
        }
        let mut visitor = JsonVisitor(Map::new());
        event.record(&mut visitor);
        let mut fields = visitor.0;
        if let Some(m) = fields.remove("message") {
            line.insert("message".into(), m);
        }
        if !fields.is_empty() {
            line.insert("fields".into(), Value::Object(fields));
        }
        let text = serde_json::to_string(&Value::Object(line)).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// An event's fields as JSON values.
struct JsonVisitor(serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonVisitor {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_log_3_bad_directives_are_refused_with_their_source() {
        let e = log_filter(Some("info,=nonsense=["), tracing::Level::INFO).unwrap_err();
        assert!(e.to_string().contains("--log"), "{e}");
        assert!(
            log_filter(
                Some("warn,blyan_runtime::transport=debug"),
                tracing::Level::INFO
            )
            .is_ok()
        );
    }

    #[test]
    fn the_node_label_is_the_address_prefix() {
        let a = Address([0xab; 20]);
        assert_eq!(node_label(&a), "0xabababab");
    }

    /// OPS-LOG-1/2: a JSON line carries the node, the spans, the message and
    /// the fields; the node span is not listed among the spans.
    #[test]
    fn ops_log_1_json_lines_name_the_node() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(move || out.clone())
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines);
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let node = node_span(&Address([0x12; 20]));
            let _n = node.enter();
            let req = tracing::info_span!("http.request");
            let _r = req.enter();
            tracing::info!(height = 7u64, "committed \"quoted\"");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["node"], "0x12121212", "{v}");
        assert_eq!(v["message"], "committed \"quoted\"", "{v}");
        assert_eq!(v["fields"]["height"], 7, "{v}");
        assert_eq!(v["level"], "INFO", "{v}");
        assert_eq!(v["spans"], serde_json::json!(["http.request"]), "{v}");
    }
}
