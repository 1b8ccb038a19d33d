//! One running node: transport, node service and HTTP API wired together
//! on pre-bound listeners (so a devnet can learn every port first).

use crate::Error;
use crate::api;
use crate::blobs::BlobStore;
use crate::config::FileConfig;
use crate::keystore::KeyFile;
use crate::service::{INBOUND_QUEUE, NodeHandle, NodeService};
use crate::transport::{GrpcTransport, Outbound, Peer, TransportConfig};
use blyan_state_machine::genesis::Genesis;
use blyan_state_machine::node::{NodeConfig, PeerId};
use k256::ecdsa::SigningKey;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::info;

/// Everything a node needs to start.
#[derive(Clone, Debug)]
pub struct NodeSetup {
    pub genesis: Genesis,
    pub key: SigningKey,
    pub data_dir: PathBuf,
    pub node: NodeConfig,
    pub peers: Vec<Peer>,
    pub max_body_bytes: usize,
    pub rate_limits: crate::ratelimit::RateLimitConfig,
    /// The blob store's cache of verified chunks.
    pub expert_cache_bytes: usize,
    /// `enabled = false`: no engine, `/chat` answers 503.
    pub inference: crate::inference::InferenceConfig,
    /// The HTTP server's timeouts and connection caps (API-HTTP-*).
    pub http: crate::http_server::HttpConfig,
    /// Usage records: retention and the PostgreSQL mirror (API-USAGE-*).
    pub logs: crate::usage::LogsConfig,
    /// Paid inference (API-KEY-*, API-PAY-*).
    pub payments: crate::billing::PaymentConfig,
    /// State sync (SYNC-*).
    pub state_sync: crate::state_sync::StateSyncConfig,
}

impl NodeSetup {
    /// From a configuration file: reads the genesis and decrypts the key
    /// (password from the environment variable the file names).
    pub fn from_config(c: &FileConfig) -> Result<NodeSetup, Error> {
        let text = std::fs::read_to_string(&c.genesis_file)
            .map_err(|e| Error::io(c.genesis_file.display(), e))?;
        let genesis = Genesis::from_json(&text).map_err(|e| Error::Genesis(e.to_string()))?;
        if genesis.chain_id != c.chain_id {
            return Err(Error::Config(format!(
                "chain_id {:?} differs from the genesis file's {:?}",
                c.chain_id, genesis.chain_id
            )));
        }
        let key_text =
            std::fs::read_to_string(&c.key_file).map_err(|e| Error::io(c.key_file.display(), e))?;
        // KEY-2: a file, the environment, or a prompt on a terminal; never
        // silently empty.
        let password = crate::keystore::resolve_password(
            crate::keystore::PasswordSources {
                given: None,
                file: c.key_password_file.as_deref(),
                env: Some(&c.key_password_env),
            },
            crate::keystore::Prompt::Once,
        )?;
        let key = KeyFile::from_json(&key_text)?.decrypt(&password)?;
        Ok(NodeSetup {
            genesis,
            key,
            data_dir: c.data_dir.clone(),
            node: NodeConfig {
                block_interval_ms: c.block_interval_ms,
                timeout_propose_per_tx_us: crate::config::TIMEOUT_PROPOSE_PER_TX_US,
                ..NodeConfig::default()
            },
            peers: c.transport_peers()?,
            max_body_bytes: c.max_body_bytes,
            rate_limits: c.rate_limits.clone(),
            expert_cache_bytes: c.expert_cache_bytes,
            inference: c.inference.clone(),
            http: c.http.clone(),
            logs: c.logs.clone(),
            payments: c.api.clone(),
            state_sync: c.state_sync.clone(),
        })
    }
}

/// A started node. Dropping it aborts its tasks; [`RunningNode::stop`] stops
/// the node task first.
pub struct RunningNode {
    pub address: PeerId,
    pub p2p_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub handle: NodeHandle,
    /// The P2P transport (partition hook, rejection counters, blob fetches).
    pub transport: Arc<GrpcTransport>,
    /// The node's blob store ([`crate::blobs::blob_dir`]), served to peers.
    pub blobs: Arc<BlobStore>,
    /// The node's usage records ([`crate::usage::usage_dir`]).
    pub usage: crate::usage::UsageLog,
    shutdown: watch::Sender<bool>,
    node_task: Option<tokio::task::JoinHandle<()>>,
    tasks: JoinSet<()>,
}

/// Binds a listener, with the address in the error.
pub async fn bind(addr: &str) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("bind {addr}"), e))
}

impl RunningNode {
    /// Starts the node; its tasks and threads run in the node's span
    /// ([`crate::telemetry::node_span`], OPS-LOG-2).
    pub async fn start(
        setup: NodeSetup,
        p2p: TcpListener,
        http: TcpListener,
    ) -> Result<RunningNode, Error> {
        use tracing::Instrument;
        let address =
            blyan_state_machine::types::Address::from_public_key(setup.key.verifying_key());
        let span = crate::telemetry::node_span(&address);
        Self::start_in_span(setup, p2p, http, span.clone())
            .instrument(span)
            .await
    }

    async fn start_in_span(
        setup: NodeSetup,
        p2p: TcpListener,
        http: TcpListener,
        span: tracing::Span,
    ) -> Result<RunningNode, Error> {
        use tracing::Instrument;
        let p2p_addr = p2p.local_addr().map_err(|e| Error::io("p2p listener", e))?;
        let http_addr = http
            .local_addr()
            .map_err(|e| Error::io("http listener", e))?;
        let mut tasks = JoinSet::new();
        let transport_config =
            TransportConfig::new(setup.genesis.chain_id.clone(), setup.peers.clone());
        let (inbound_tx, inbound_rx) = mpsc::channel(
            INBOUND_QUEUE.max(crate::transport::inbound_queue_len(&transport_config)),
        );
        let blobs_dir = crate::blobs::blob_dir(&setup.data_dir);
        let cache_bytes = setup.expert_cache_bytes;
        let blobs_span = span.clone();
        let blobs = Arc::new(
            tokio::task::spawn_blocking(move || {
                blobs_span.in_scope(|| BlobStore::open_with_cache(&blobs_dir, cache_bytes))
            })
            .await
            .map_err(|e| Error::Node(format!("blob store task failed: {e}")))??,
        );
        if setup.node.sync_batch_bytes > crate::transport::MAX_SYNC_BATCH_BYTES {
            return Err(Error::Config(format!(
                "sync_batch_bytes {} exceeds what a P2P frame carries ({} bytes)",
                setup.node.sync_batch_bytes,
                crate::transport::MAX_SYNC_BATCH_BYTES
            )));
        }
        let transport = GrpcTransport::start(
            p2p,
            setup.key.clone(),
            transport_config,
            inbound_tx,
            Some(blobs.clone()),
            &mut tasks,
        )?;
        let outbound: Arc<dyn Outbound> = transport.clone();
        if setup.inference.enabled
            && let Some(dir) = &setup.inference.model_dir
            && dir.join("manifest.json").is_file()
        {
            crate::model::check_registered(&setup.genesis, dir)?;
        }
        let inference = if setup.inference.enabled {
            Some(crate::inference::InferenceHandle::start(setup.inference.clone()).await?)
        } else {
            None
        };
        setup
            .payments
            .check(setup.genesis.params.allowance_grace_blocks)
            .map_err(Error::Config)?;
        // API-USAGE-*: the usage records, in their own database.
        setup
            .logs
            .validate()
            .map_err(|e| Error::Config(format!("logs.{e}")))?;
        let usage_dir = crate::usage::usage_dir(&setup.data_dir);
        let usage_config = setup.logs.usage_config();
        // OPS-LOG-2: fjall logs the database's creation on this thread.
        let usage_span = span.clone();
        let usage = tokio::task::spawn_blocking(move || {
            usage_span.in_scope(|| crate::usage::UsageLog::open(&usage_dir, usage_config))
        })
        .await
        .map_err(|e| Error::Node(format!("usage log task failed: {e}")))??;
        let postgres_url = setup.logs.postgres_url.clone();
        let mut api_config = api::ApiConfig {
            usage: Some(usage.clone()),
            max_body_bytes: setup.max_body_bytes,
            rate_limits: setup.rate_limits.clone(),
            payments: setup.payments.clone(),
            ..api::ApiConfig::default()
        };
        // NODE-OWN-1: one nonce sequence for every transaction the node signs.
        let own = Arc::new(crate::own_tx::OwnTxs::new(setup.key.clone()));
        #[cfg(feature = "inference")]
        let evaluator_setup = crate::pol_eval::EvaluatorSetup {
            genesis: setup.genesis.clone(),
            model_dir: setup.inference.model_dir.clone(),
            key: setup.key.clone(),
            misreport_loss_ppm: setup.inference.misreport_loss_ppm,
        };
        let advertise_key = setup.key.clone();
        let heartbeat_config = blyan_route::heartbeat::HeartbeatConfig {
            heartbeat_interval_ms: setup.inference.heartbeat_interval_ms,
            ..Default::default()
        };
        let advertise = setup.inference.advertise;
        let setup_heartbeat_interval_ms = setup.inference.heartbeat_interval_ms;
        let price_per_1k = setup.genesis.params.inference_price_per_1k_tokens;
        let data_dir = setup.data_dir.clone();
        let setup_http = setup.http.clone();
        let peers_configured = setup
            .peers
            .iter()
            .filter(|p| p.id() != Some(address_of(&setup.key)))
            .count();
        // SYNC-*: snapshots served to peers; an empty store with a trusted
        // block starts from a seed's snapshot of it.
        let snapshots = crate::state_sync::Snapshots::new();
        transport.set_snapshot_source(snapshots.clone());
        if let Some(trusted) = setup.state_sync.trust()? {
            let (dir, genesis) = (data_dir.clone(), setup.genesis.clone());
            let empty = tokio::task::spawn_blocking(move || {
                crate::store::ChainStore::open(&dir, &genesis).and_then(|(s, _)| s.height())
            })
            .await
            .map_err(|e| Error::Node(format!("store task failed: {e}")))??
                == 0;
            if empty {
                tracing::info!(
                    height = trusted.0,
                    "state sync: fetching the trusted snapshot"
                );
                let (ledger, last, sets) =
                    crate::state_sync::restore(&transport, &setup.peers, &setup.genesis, trusted)
                        .await?;
                let (dir, genesis) = (data_dir.clone(), setup.genesis.clone());
                tokio::task::spawn_blocking(move || {
                    let (mut store, _) = crate::store::ChainStore::open(&dir, &genesis)?;
                    store.import_snapshot(&ledger, &last, &sets)
                })
                .await
                .map_err(|e| Error::Node(format!("store task failed: {e}")))??;
                tracing::info!(height = trusted.0, "state sync: state restored");
            }
        }
        let snapshot_interval_blocks = setup.state_sync.snapshot_interval_blocks;
        let open_span = span.clone();
        let seeds = setup.peers.clone();
        let (mut service, handle, requests) = tokio::task::spawn_blocking(move || {
            open_span.in_scope(|| {
                NodeService::open(setup.node, setup.key, &setup.genesis, &data_dir, outbound)
            })
        })
        .await
        .map_err(|e| Error::Node(format!("start-up task failed: {e}")))??;
        service.set_seeds(seeds);
        service.set_snapshots(snapshots, snapshot_interval_blocks);
        handle
            .chain_metrics
            .peers_configured
            .store(peers_configured, std::sync::atomic::Ordering::Relaxed);
        let (shutdown, shutdown_rx) = watch::channel(false);
        // NODE-HOST-2: the node task gets an OS thread of its own (a
        // current-thread runtime on the blocking pool). Its steps are
        // CPU-bound (building or validating a block of 2,000 transfers takes
        // 20–50 ms of CPU); on the shared async workers one such step
        // stalled every connection of this process behind it, and votes
        // waited tens of ms to be read. On a thread of its own the OS
        // scheduler time-slices it against the transport and the API.
        let node_runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("node task runtime", e))?;
        let node_shutdown = shutdown_rx.clone();
        // API-USAGE-4/5: hourly pruning; the PostgreSQL mirror if configured.
        tasks.spawn(
            crate::usage::run_pruning(
                usage.clone(),
                crate::usage::PRUNE_INTERVAL_MS,
                shutdown_rx.clone(),
            )
            .in_current_span(),
        );
        if let Some(url) = postgres_url {
            tasks.spawn(
                crate::usage::mirror_to_postgres(
                    usage.clone(),
                    crate::usage::MirrorOptions::new(url, handle.address),
                    shutdown_rx.clone(),
                )?
                .in_current_span(),
            );
        }
        // RT-HB-10..12: every node keeps the table of live inference nodes;
        // an inference node that advertises sends its heartbeats.
        let heartbeats = crate::heartbeats::Heartbeats::new(
            handle.clone(),
            transport.peer_stats(),
            heartbeat_config,
        )?;
        transport.set_heartbeat_sink(heartbeats.clone());
        api_config.heartbeats = Some(heartbeats.clone());
        // RT-STAGE-1..5: peers' Generate calls are served by the engine, and
        // this node's chat requests are routed to the model's holders.
        if let Some(engine) = &inference {
            let ledger = handle.snapshot.borrow().ledger.clone();
            // RT-PIPE-8: this node's stages call other nodes' experts.
            engine.set_expert_client(Arc::new(crate::experts::TransportExperts {
                transport: Arc::downgrade(&transport),
                runtime: tokio::runtime::Handle::current(),
                timeout_ms: engine.config.timeout_ms,
            }));
            transport.set_stage_sink(Arc::new(crate::router::StageServer {
                engine: engine.clone(),
                model: crate::api::chat::served_model_id(&ledger, engine),
                perturb: engine.config.perturb_outputs,
                identity: Some(crate::pipeline::StageIdentity {
                    key: advertise_key.clone(),
                    chain_id: handle.chain_id.clone(),
                }),
            }));
            let router = Arc::new(crate::router::Router::new(
                handle.address,
                handle.chain_id.clone(),
                advertise_key.clone(),
                transport.clone(),
                heartbeats,
                advertise,
                engine.config.spot_check_rate_ppm,
            )?);
            // RT-BEACON-*: between client requests, the router checks the
            // nodes it routes to with requests it makes up.
            if let Some(model) = crate::api::chat::served_model_id(&ledger, engine) {
                tasks.spawn(
                    router
                        .clone()
                        .run_beacons(
                            engine.clone(),
                            model,
                            crate::corpus::HOLDOUT_TEXT,
                            engine.config.beacon_interval_ms,
                            shutdown_rx.clone(),
                        )
                        .in_current_span(),
                );
            }
            api_config.router = Some(router);
        }
        // POL-SERVE-*: the engine serves the chain's heads of its model.
        #[cfg(feature = "inference")]
        if let Some(engine) = &inference {
            let ledger = handle.snapshot.borrow().ledger.clone();
            if let Some(model_id) = crate::api::chat::served_model_id(&ledger, engine) {
                // Before the first answer: the head the chain holds now (a
                // restart on a chain with accepted deltas serves them).
                let first = crate::pol_serve::sync_head(
                    &handle, &transport, &blobs, engine, &model_id, "",
                )
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "the chain's head could not be built yet; retrying");
                    String::new()
                });
                tasks.spawn(
                    crate::pol_serve::run_follower(
                        handle.clone(),
                        transport.clone(),
                        blobs.clone(),
                        engine.clone(),
                        model_id,
                        first,
                        shutdown_rx.clone(),
                    )
                    .in_current_span(),
                );
            }
        }
        if advertise && let Some(engine) = &inference {
            tasks.spawn(
                crate::heartbeats::run_advertiser(
                    transport.clone(),
                    handle.clone(),
                    engine.clone(),
                    advertise_key,
                    setup_heartbeat_interval_ms,
                )
                .in_current_span(),
            );
        }
        let node_span = span.clone();
        let node_task = tokio::task::spawn_blocking(move || {
            node_runtime.block_on(
                service
                    .run(requests, inbound_rx, node_shutdown)
                    .instrument(node_span),
            );
        });
        // API-PAY-*: one meter shared by the API (charges) and the settler.
        let meter = Arc::new(crate::billing::Meter::new(
            handle.address,
            price_per_1k,
            api_config.payments.max_unsettled_requests,
        ));
        tasks.spawn(
            crate::billing::run_settler(
                handle.clone(),
                own.clone(),
                meter.clone(),
                api_config.payments.settle_interval_blocks,
                shutdown_rx.clone(),
            )
            .in_current_span(),
        );
        // POL-EVAL-*: a validator evaluates revealed deltas and attests.
        #[cfg(feature = "inference")]
        tasks.spawn(
            crate::pol_eval::run_evaluator(
                handle.clone(),
                transport.clone(),
                blobs.clone(),
                own.clone(),
                evaluator_setup,
                shutdown_rx.clone(),
            )
            .in_current_span(),
        );
        let router = api::router_with_meter(
            handle.clone(),
            &api_config,
            inference,
            Some(blobs.clone()),
            meter,
        );
        // API-HTTP-*: header and request timeouts, connection caps,
        // TCP_NODELAY, a raised RLIMIT_NOFILE (crate::http_server).
        let http_stats = Arc::new(crate::http_server::HttpStats::default());
        let router = crate::http_server::with_limits(router, &setup_http, http_stats.clone());
        tasks.spawn(
            crate::http_server::serve(http, router, setup_http, http_stats, shutdown_rx)
                .in_current_span(),
        );
        info!(address = %handle.address, %p2p_addr, %http_addr, "node running");
        Ok(RunningNode {
            address: handle.address,
            p2p_addr,
            http_addr,
            handle,
            transport,
            blobs,
            usage,
            shutdown,
            node_task: Some(node_task),
            tasks,
        })
    }

    /// `http://host:port` of the API.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// Whether the node task is still running.
    pub fn is_running(&self) -> bool {
        self.node_task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the node task (waiting up to `wait_ms` for it), then every other task.
    /// The node task ends at its next input once it sees the shutdown (its
    /// steps are short; a blocking-pool task cannot be aborted).
    pub async fn stop(mut self, wait_ms: u64) {
        let _ = self.shutdown.send(true);
        if let Some(mut t) = self.node_task.take()
            && tokio::time::timeout(Duration::from_millis(wait_ms), &mut t)
                .await
                .is_err()
        {
            tracing::warn!(wait_ms, "node task did not stop in time; left to finish");
        }
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = &self.node_task {
            t.abort();
        }
    }
}

/// The address of a node key.
fn address_of(key: &SigningKey) -> blyan_state_machine::types::Address {
    blyan_state_machine::types::Address::from_public_key(key.verifying_key())
}
