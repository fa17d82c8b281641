//! The catalogue of gRPC methods served on the port: their service, method name and
//! streaming kind. The middleware labels metrics and spans from it (anything else is
//! "unknown", so arbitrary paths never create new metric series), the handlers name
//! their RPC with it, and the caller allow-lists accept exactly its AnalyticsService and
//! AnalyticsAdminService methods.

/// One method served on the gRPC port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Rpc {
    TrackEvent,
    TrackEvents,
    IdentifyUser,
    GetEventCount,
    GetUserCount,
    HealthCheck,
    /// AnalyticsAdminService: closed by default (see [`Rpc::is_admin`]).
    DeleteUser,
    GetUserDeletion,
    LiftSuppression,
    ExportUser,
    /// grpc.health.v1.Health/Check.
    StandardHealthCheck,
    /// grpc.health.v1.Health/Watch.
    StandardHealthWatch,
    ReflectionV1,
    ReflectionV1Alpha,
}

/// The fully-qualified name of our service.
pub(crate) const ANALYTICS_SERVICE: &str = "analytics.v1.AnalyticsService";
/// The fully-qualified name of the administrative service (erasure and access requests).
pub(crate) const ADMIN_SERVICE: &str = "analytics.v1.AnalyticsAdminService";

impl Rpc {
    pub(crate) const ALL: [Rpc; 14] = [
        Rpc::TrackEvent,
        Rpc::TrackEvents,
        Rpc::IdentifyUser,
        Rpc::GetEventCount,
        Rpc::GetUserCount,
        Rpc::HealthCheck,
        Rpc::DeleteUser,
        Rpc::GetUserDeletion,
        Rpc::LiftSuppression,
        Rpc::ExportUser,
        Rpc::StandardHealthCheck,
        Rpc::StandardHealthWatch,
        Rpc::ReflectionV1,
        Rpc::ReflectionV1Alpha,
    ];

    /// The fully-qualified service name (`grpc_service` label, `rpc.service`).
    pub(crate) fn service(self) -> &'static str {
        match self {
            Rpc::TrackEvent
            | Rpc::TrackEvents
            | Rpc::IdentifyUser
            | Rpc::GetEventCount
            | Rpc::GetUserCount
            | Rpc::HealthCheck => ANALYTICS_SERVICE,
            Rpc::DeleteUser | Rpc::GetUserDeletion | Rpc::LiftSuppression | Rpc::ExportUser => ADMIN_SERVICE,
            Rpc::StandardHealthCheck | Rpc::StandardHealthWatch => "grpc.health.v1.Health",
            Rpc::ReflectionV1 => "grpc.reflection.v1.ServerReflection",
            Rpc::ReflectionV1Alpha => "grpc.reflection.v1alpha.ServerReflection",
        }
    }

    /// The method name as in the proto (`grpc_method` label, `rpc.method`).
    pub(crate) fn method(self) -> &'static str {
        match self {
            Rpc::TrackEvent => "TrackEvent",
            Rpc::TrackEvents => "TrackEvents",
            Rpc::IdentifyUser => "IdentifyUser",
            Rpc::GetEventCount => "GetEventCount",
            Rpc::GetUserCount => "GetUserCount",
            Rpc::HealthCheck => "HealthCheck",
            Rpc::DeleteUser => "DeleteUser",
            Rpc::GetUserDeletion => "GetUserDeletion",
            Rpc::LiftSuppression => "LiftSuppression",
            Rpc::ExportUser => "ExportUser",
            Rpc::StandardHealthCheck => "Check",
            Rpc::StandardHealthWatch => "Watch",
            Rpc::ReflectionV1 | Rpc::ReflectionV1Alpha => "ServerReflectionInfo",
        }
    }

    /// The go-grpc-prometheus `grpc_type`: unary, server_stream or bidi_stream.
    pub(crate) fn kind(self) -> &'static str {
        match self {
            Rpc::StandardHealthWatch | Rpc::ExportUser => "server_stream",
            Rpc::ReflectionV1 | Rpc::ReflectionV1Alpha => "bidi_stream",
            _ => "unary",
        }
    }

    /// An AnalyticsService or AnalyticsAdminService method: what
    /// TLS_ALLOWED_CALLERS(_PER_RPC) restrict.
    pub(crate) fn is_analytics(self) -> bool {
        self.service() == ANALYTICS_SERVICE || self.is_admin()
    }

    /// An AnalyticsAdminService method: refused unless allowed explicitly (a per-RPC
    /// allow-list entry with mTLS, ADMIN_RPCS_ENABLED without).
    pub(crate) fn is_admin(self) -> bool {
        self.service() == ADMIN_SERVICE
    }

    /// The method of a request path `/{service}/{method}`; `None` for anything else.
    pub(crate) fn from_path(path: &str) -> Option<Rpc> {
        let (service, method) = path.strip_prefix('/')?.split_once('/')?;
        Rpc::ALL.into_iter().find(|rpc| rpc.service() == service && rpc.method() == method)
    }

    /// The AnalyticsService method of this proto name (e.g. `GetEventCount`).
    pub(crate) fn analytics_method(name: &str) -> Option<Rpc> {
        Rpc::ALL.into_iter().find(|rpc| rpc.is_analytics() && rpc.method() == name)
    }

    /// The AnalyticsService methods, in proto order.
    pub(crate) fn analytics_methods() -> impl Iterator<Item = Rpc> {
        Rpc::ALL.into_iter().filter(|rpc| rpc.is_analytics())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_to_their_method_and_nothing_else() {
        assert_eq!(Rpc::from_path("/analytics.v1.AnalyticsService/TrackEvent"), Some(Rpc::TrackEvent));
        assert_eq!(Rpc::from_path("/grpc.health.v1.Health/Watch").map(Rpc::kind), Some("server_stream"));
        assert_eq!(
            Rpc::from_path("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Some(Rpc::ReflectionV1Alpha)
        );
        for path in
            ["/analytics.v1.AnalyticsService/Nope", "/random", "", "analytics.v1.AnalyticsService/TrackEvent"]
        {
            assert_eq!(Rpc::from_path(path), None, "{path:?}");
        }
        for rpc in Rpc::ALL {
            assert_eq!(Rpc::from_path(&format!("/{}/{}", rpc.service(), rpc.method())), Some(rpc));
        }
    }

    #[test]
    fn the_allow_lists_name_the_analytics_methods_only() {
        let names: Vec<&str> = Rpc::analytics_methods().map(Rpc::method).collect();
        assert_eq!(
            names,
            [
                "TrackEvent",
                "TrackEvents",
                "IdentifyUser",
                "GetEventCount",
                "GetUserCount",
                "HealthCheck",
                "DeleteUser",
                "GetUserDeletion",
                "LiftSuppression",
                "ExportUser"
            ]
        );
        assert_eq!(Rpc::analytics_method("GetUserCount"), Some(Rpc::GetUserCount));
        assert_eq!(Rpc::analytics_method("Check"), None);
    }

    #[test]
    fn the_helm_schema_lists_the_same_per_rpc_names() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../helm/analytics-service/values.schema.json")).unwrap();
        let listed = schema["properties"]["tls"]["properties"]["allowedCallersPerRpc"]["properties"]
            .as_object()
            .expect("tls.allowedCallersPerRpc in the Helm values schema");
        let mut listed: Vec<&str> = listed.keys().map(String::as_str).collect();
        let mut known: Vec<&str> = Rpc::analytics_methods().map(Rpc::method).collect();
        listed.sort_unstable();
        known.sort_unstable();
        assert_eq!(listed, known);
    }
}
