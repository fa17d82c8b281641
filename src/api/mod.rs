//! The edges of the service: the gRPC API (handlers of AnalyticsService and
//! AnalyticsAdminService, proto <-> domain conversion,
//! status mapping, middleware, standard health) and the plain HTTP admin port.
//! Only this module knows protobuf types.

pub(crate) mod admin;
pub(crate) mod admin_grpc;
pub mod convert;
pub(crate) mod grpc;
pub(crate) mod health;
pub(crate) mod malformed;
pub mod middleware;
pub(crate) mod preface;
pub(crate) mod status;
