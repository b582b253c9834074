// Command specdec-client streams a generation from the specdec orchestrator over its public gRPC
// API (specdec.v1.Orchestrator/GenerateStream): a minimal Go application of the protocol.
//
//	go build -o specdec-client . && ./specdec-client -address 127.0.0.1:50050 -chat "Write a haiku about rivers."
//
// The text goes to stdout as it arrives; finish reason and statistics go to stderr at the end.
// A status other than OK is printed as "error: Code: message" with exit status 1.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	specdecv1 "specdec/clients/go/specdec/v1"
)

func main() {
	address := flag.String("address", "127.0.0.1:50050", "orchestrator address (host:port)")
	chat := flag.Bool("chat", false, "send the prompt as a user chat message (the target's chat template) instead of raw text")
	maxNewTokens := flag.Int("max-new-tokens", 64, "tokens to generate at most")
	k := flag.Int("k", -1, "draft tokens per round (num_speculative_tokens); -1 = the server's default, 0 = target-only")
	temperature := flag.Float64("temperature", 0, "0 = greedy")
	token := flag.String("token", "", "bearer token, sent as 'authorization: Bearer <token>'")
	caFile := flag.String("ca", "", "PEM file of the certificate authorities to trust: use TLS (default: plaintext)")
	timeout := flag.Duration("timeout", 10*time.Minute, "deadline of the call")
	flag.Usage = func() {
		fmt.Fprintln(flag.CommandLine.Output(), "usage: specdec-client [flags] PROMPT")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(*address, *caFile, *token, *timeout, request(flag.Arg(0), *chat, *maxNewTokens, *k, *temperature)); err != nil {
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		os.Exit(1)
	}
}

func request(prompt string, chat bool, maxNewTokens, k int, temperature float64) *specdecv1.GenerateRequest {
	req := &specdecv1.GenerateRequest{MaxNewTokens: int32(maxNewTokens), Temperature: float32(temperature)}
	if chat {
		req.Messages = []*specdecv1.ChatMessage{{Role: "user", Content: prompt}}
	} else {
		req.Prompt = prompt
	}
	if k >= 0 { // unset (nil) means the server's default K, so -1 must not become 0
		req.NumSpeculativeTokens = proto.Int32(int32(k))
	}
	return req
}

func run(address, caFile, token string, timeout time.Duration, req *specdecv1.GenerateRequest) error {
	creds := insecure.NewCredentials()
	if caFile != "" {
		tls, err := credentials.NewClientTLSFromFile(caFile, "")
		if err != nil {
			return err
		}
		creds = tls
	}
	conn, err := grpc.NewClient(address, grpc.WithTransportCredentials(creds))
	if err != nil {
		return err
	}
	defer conn.Close()

	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	}
	stream, err := specdecv1.NewOrchestratorClient(conn).GenerateStream(ctx, req)
	if err != nil {
		return describe(err)
	}
	var last *specdecv1.GenerateResponse
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return describe(err)
		}
		fmt.Print(msg.GetText())
		last = msg
	}
	fmt.Println()
	if last == nil || last.GetFinishReason() == specdecv1.FinishReason_FINISH_REASON_UNSPECIFIED {
		return errors.New("the stream ended without a finish reason")
	}
	s := last.GetStats()
	fmt.Fprintf(os.Stderr, "finish=%s tokens=%d K=%d acceptance=%.2f tokens/target-forward=%.2f time=%.2fs\n",
		strings.ToLower(strings.TrimPrefix(last.GetFinishReason().String(), "FINISH_REASON_")),
		s.GetGeneratedTokens(), s.GetNumSpeculativeTokens(), s.GetAcceptanceRate(), s.GetTokensPerTargetForward(), s.GetTotalSeconds())
	return nil
}

// describe turns a gRPC error into "Code: message" (e.g. "InvalidArgument: max_new_tokens must be ...").
func describe(err error) error {
	if st, ok := status.FromError(err); ok {
		return fmt.Errorf("%s: %s", st.Code(), st.Message())
	}
	return err
}
