"""gRPC plumbing every service uses, and nothing about models: server assembly (`server`),
interceptors for authentication and draining (`interceptors`), the one place where errors become
statuses (`errors`), and TLS credentials (`tls`)."""
