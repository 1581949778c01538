// An unmodified aws-sdk-js v3 client: credentials from the instance metadata service
// (AWS_EC2_METADATA_SERVICE_ENDPOINT points at iamlet), then STS GetCallerIdentity.
import { fromInstanceMetadata } from "@aws-sdk/credential-providers";
import { STSClient, GetCallerIdentityCommand } from "@aws-sdk/client-sts";

const credentials = fromInstanceMetadata({ timeout: 2000, maxRetries: 1 });
const sts = new STSClient({ region: process.env.AWS_REGION || "us-east-1", credentials });
const out = await sts.send(new GetCallerIdentityCommand({}));
console.log(out.Arn);
