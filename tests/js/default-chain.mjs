// An unmodified aws-sdk-js v3 client with its default credential chain (the container
// provider, when AWS_CONTAINER_CREDENTIALS_FULL_URI and AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE
// are set), then STS GetCallerIdentity; prints the caller's ARN.
import { STSClient, GetCallerIdentityCommand } from "@aws-sdk/client-sts";

const sts = new STSClient({ region: process.env.AWS_REGION || "us-east-1" });
const out = await sts.send(new GetCallerIdentityCommand({}));
console.log(out.Arn);
