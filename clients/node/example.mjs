// Calls every bitserve RPC once and prints one JSON line per call: node example.mjs [host:port]
import path from "node:path";
import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const here = path.dirname(fileURLToPath(import.meta.url));
const PROTO = path.join(here, "../../protos/bitserve/v1/inference.proto");
const target = process.argv[2] ?? "localhost:50051";

const def = protoLoader.loadSync(PROTO, {
  keepCase: true, // the .proto's own field names (max_new_tokens), not camelCase
  longs: String, // uint64 fields arrive as strings: JavaScript numbers stop being exact at 2^53
  enums: String, // enum values as names: "FINISH_REASON_LENGTH"
  defaults: true, // fields at their default value are present (ready: false, not missing)
  oneofs: true,
});
const { Inference } = grpc.loadPackageDefinition(def).bitserve.v1;
const client = new Inference(target, grpc.credentials.createInsecure());
const deadline = () => new Date(Date.now() + 120_000);

const unary = (method, request) =>
  new Promise((resolve, reject) =>
    client[method](request, { deadline: deadline() }, (err, res) => (err ? reject(err) : resolve(res))),
  );

const stream = (method, request) =>
  new Promise((resolve, reject) => {
    const messages = [];
    const call = client[method](request, { deadline: deadline() });
    call.on("data", (m) => messages.push(m));
    call.on("error", reject);
    call.on("end", () => resolve(messages));
  });

const show = (rpc, result) => console.log(JSON.stringify({ rpc, result }));

try {
  const models = await unary("ListModels", {});
  for (const m of models.models) {
    // quality_report_json is JSON inside a string: parse it a second time
    m.quality_report = m.quality_report_json ? JSON.parse(m.quality_report_json) : null;
  }
  show("ListModels", models);
  show("Generate", await unary("Generate", { texts: ["The capital of France is"], parameters: { max_new_tokens: 16 } }));
  show("GenerateStream", await stream("GenerateStream", { texts: ["Once upon a time"], parameters: { max_new_tokens: 8 } }));
  // Structured output and sampling controls: the schema is JSON text; a choice is a list.
  const schema = { type: "object", properties: { age: { type: "integer", minimum: 0, maximum: 120 } }, required: ["age"] };
  show(
    "GenerateStructured",
    await unary("Generate", {
      texts: ["A user as JSON:"],
      parameters: { max_new_tokens: 32, n: 2, top_logprobs: 2, logit_bias: { 0: -100 }, constraint: { json_schema: JSON.stringify(schema) } },
    }),
  );
  show(
    "StreamRegex",
    await stream("GenerateStream", {
      texts: ["Today is"],
      parameters: { max_new_tokens: 12, constraint: { regex: "20[0-9]{2}-[01][0-9]-[0-3][0-9]" } },
    }),
  );
  const question = [{ role: "user", content: "What is the capital of France?" }];
  show("Chat", await unary("Chat", { messages: question, parameters: { max_new_tokens: 24 } }));
  show("ChatStream", await stream("ChatStream", { messages: question, parameters: { max_new_tokens: 8 } }));
  show(
    "Classify",
    await unary("Classify", {
      texts: ["Manchester United beat Liverpool 2-1 at Old Trafford."],
      candidate_labels: ["business", "sports", "politics", "tech"],
    }),
  );
  show("Sentiment", await unary("Sentiment", { texts: ["I love this movie, it is wonderful!", "This is terrible, I hate it."] }));
  show("Translate", await unary("Translate", { texts: ["Where is the train station?"], source_lang: "en", target_lang: "fr" }));
  const tokens = await unary("Tokenize", { texts: ["in the"], model: "smollm2" });
  show("Tokenize", tokens);
  show("Detokenize", await unary("Detokenize", { ids: tokens.results[0].ids, model: "smollm2" }));
  try {
    await unary("Chat", { messages: [{ role: "wizard", content: "hi" }] });
  } catch (err) {
    // errors are gRPC statuses whose details name the field to fix
    show("error", { code: grpc.status[err.code], details: err.details });
  }
} finally {
  client.close();
}
