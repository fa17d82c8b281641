//! The `analytics-service` binary: `serve` (default), `migrate`, `healthcheck`,
//! `reencrypt`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use analytics_service::config::Config;
use analytics_service::repository::postgres::pii::reencrypt_all;
use analytics_service::repository::postgres::{migration_connect_options, partitions, schema, Database};
use analytics_service::security::pii::PiiCipher;
use analytics_service::service::EVENT_MIGRATION_APPLIED;
use analytics_service::startup::{Application, Components};
use analytics_service::telemetry::{self, TelemetryGuard};
use clap::{Parser, Subcommand};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[derive(Parser)]
#[command(name = "analytics-service", version, about = "Event tracking and user identification over gRPC")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC server and the admin HTTP port (the default).
    Serve,
    /// Apply pending database migrations and exit (safe to run from several pods at once).
    Migrate {
        /// Only check: exit 0 when the schema is current, 3 when it is behind (or was built by
        /// other migrations: recreate the database).
        #[arg(long)]
        check: bool,
        /// With --check: keep checking until current or this many seconds have passed.
        #[arg(long, default_value_t = 0, requires = "check")]
        wait_seconds: u64,
    },
    /// Rewrite stored sensitive values (PII_FIELDS, and anything encrypted under an older
    /// key) under the current key of PII_KEYS_FILE, in batches; safe to re-run.
    Reencrypt,
    /// Ask a running server's grpc.health.v1 service; exit 0 only when it is SERVING.
    Healthcheck {
        /// host:port of the gRPC server.
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
        /// Service to ask about; "" is the whole server.
        #[arg(long, default_value = "")]
        service: String,
        /// Seconds to wait for an answer.
        #[arg(long, default_value_t = 5)]
        timeout_seconds: u64,
        /// CA bundle that signed the server certificate (enables TLS).
        #[arg(long)]
        tls_ca_file: Option<String>,
        /// Client certificate for mTLS.
        #[arg(long, requires = "tls_key_file")]
        tls_cert_file: Option<String>,
        /// Client key for mTLS.
        #[arg(long, requires = "tls_cert_file")]
        tls_key_file: Option<String>,
        /// Name expected in the server certificate (default: the host of --addr).
        #[arg(long)]
        tls_server_name: Option<String>,
    },
}

/// Exit code of `migrate --check` when migrations are pending.
const EXIT_SCHEMA_BEHIND: u8 = 3;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => run(serve()).await,
        Command::Migrate { check, wait_seconds } => run(migrate(check, wait_seconds)).await,
        Command::Reencrypt => run(reencrypt()).await,
        Command::Healthcheck {
            addr,
            service,
            timeout_seconds,
            tls_ca_file,
            tls_cert_file,
            tls_key_file,
            tls_server_name,
        } => {
            let tls = TlsFiles {
                ca: tls_ca_file,
                cert: tls_cert_file,
                key: tls_key_file,
                server_name: tls_server_name,
            };
            healthcheck(&addr, &service, Duration::from_secs(timeout_seconds), tls).await
        }
    }
}

async fn run(verb: impl std::future::Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
    match verb.await {
        Ok(code) => code,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "exiting");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads the configuration and installs logging/tracing; keep the guard alive until exit.
fn load_config() -> anyhow::Result<(Config, TelemetryGuard)> {
    match Config::from_env().and_then(|config| config.check_ca_files().map(|()| config)) {
        Ok(config) => {
            let guard = telemetry::init(&config.telemetry)?;
            Ok((config, guard))
        }
        Err(error) => {
            telemetry::init_plain();
            Err(error.into())
        }
    }
}

async fn serve() -> anyhow::Result<ExitCode> {
    let (config, _telemetry) = load_config()?;
    tracing::info!(version = env!("CARGO_PKG_VERSION"), config = ?config, "starting");
    let application = Application::build(config).await?;
    application.run_until_stopped(shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

async fn migrate(check: bool, wait_seconds: u64) -> anyhow::Result<ExitCode> {
    let (config, _telemetry) = load_config()?;
    if !check {
        let report = schema::migrate(&migration_connect_options(&config.postgres)?).await?;
        tracing::info!(applied = ?report.applied, "migrations up to date");
        let created = partitions::ensure_accepted_partitions(
            &Database::connect_lazy(&config.postgres),
            chrono::Utc::now(),
            config.events.max_age,
        )
        .await?;
        tracing::info!(created, "event partitions created ahead");
        if config.server.self_tracking && !report.applied.is_empty() {
            // Self-tracking: the migration shows up in the service's own counts.
            let components = Components::for_command(&config);
            components.readiness.probe().await;
            let latest = schema::expected_versions().last().copied().unwrap_or(0);
            let properties = vec![("version", latest.to_string()), ("applied", report.applied.join(","))];
            components.service.track_lifecycle(EVENT_MIGRATION_APPLIED, properties).await;
            components.shutdown(config.server.shutdown_drain).await;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let database = Database::connect_lazy(&config.postgres);
    let deadline = Instant::now() + Duration::from_secs(wait_seconds);
    loop {
        match schema::status(&database).await {
            Ok(status) if status.is_usable() => {
                tracing::info!(status = ?status, "schema is current");
                return Ok(ExitCode::SUCCESS);
            }
            Ok(status @ schema::SchemaStatus::Diverged { .. }) => {
                tracing::error!(status = ?status, "database was built by other migrations; recreate it");
                return Ok(ExitCode::from(EXIT_SCHEMA_BEHIND));
            }
            Ok(status) => tracing::info!(status = ?status, "schema is behind, waiting for `migrate`"),
            Err(error) => tracing::info!(error = %error, "database not reachable yet"),
        }
        if Instant::now() >= deadline {
            return Ok(ExitCode::from(EXIT_SCHEMA_BEHIND));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn reencrypt() -> anyhow::Result<ExitCode> {
    let (config, _telemetry) = load_config()?;
    let keys =
        config.pii.keys()?.ok_or_else(|| anyhow::anyhow!("PII_KEYS_FILE (or PII_KEYS) is required"))?;
    let current_key_id = keys.current_key_id().to_string();
    let fields = config.pii.fields.clone();
    let cipher = PiiCipher::new(fields.clone(), keys);
    let database = Database::connect_lazy(&config.postgres);
    let (events, users) = reencrypt_all(&database, &cipher, &fields).await?;
    tracing::info!(
        current_key_id,
        events_rewritten = events.rows_rewritten,
        events_failed = events.rows_failed,
        users_rewritten = users.rows_rewritten,
        users_failed = users.rows_failed,
        "reencrypt finished"
    );
    println!(
        "reencrypt: key {current_key_id}: events {} rewritten, {} failed; user_identities {} rewritten, {} failed",
        events.rows_rewritten, events.rows_failed, users.rows_rewritten, users.rows_failed
    );
    database.close().await;
    let failed = events.rows_failed + users.rows_failed;
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

struct TlsFiles {
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    server_name: Option<String>,
}

async fn healthcheck(addr: &str, service: &str, timeout: Duration, tls: TlsFiles) -> ExitCode {
    telemetry::init_plain();
    let result = tokio::time::timeout(timeout, ask_health(addr, service, tls)).await;
    match result {
        Ok(Ok(ServingStatus::Serving)) => {
            println!("SERVING");
            ExitCode::SUCCESS
        }
        Ok(Ok(status)) => {
            println!("{}", status.as_str_name());
            ExitCode::FAILURE
        }
        Ok(Err(error)) => {
            eprintln!("healthcheck failed: {error:#}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("healthcheck failed: no answer within {} s", timeout.as_secs());
            ExitCode::FAILURE
        }
    }
}

async fn ask_health(addr: &str, service: &str, tls: TlsFiles) -> anyhow::Result<ServingStatus> {
    let scheme = if tls.ca.is_some() { "https" } else { "http" };
    let mut endpoint = Channel::from_shared(format!("{scheme}://{addr}"))?;
    if let Some(ca_file) = &tls.ca {
        let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host).trim_matches(['[', ']']);
        let mut tls_config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(ca_file)?))
            .domain_name(tls.server_name.clone().unwrap_or_else(|| host.to_string()));
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            tls_config = tls_config.identity(Identity::from_pem(std::fs::read(cert)?, std::fs::read(key)?));
        }
        endpoint = endpoint.tls_config(tls_config)?;
    }
    let channel = endpoint.connect().await?;
    let response =
        HealthClient::new(channel).check(HealthCheckRequest { service: service.to_string() }).await?;
    Ok(response.into_inner().status())
}
