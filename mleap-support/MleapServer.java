package openfx.mleap;

import java.io.BufferedReader;
import java.io.File;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import ml.combust.mleap.core.types.DataType;
import ml.combust.mleap.core.types.StructType;
import ml.combust.mleap.core.types.TensorType;
import ml.combust.mleap.runtime.MleapContext;
import ml.combust.mleap.runtime.frame.DefaultLeapFrame;
import ml.combust.mleap.runtime.frame.Row;
import ml.combust.mleap.runtime.frame.Transformer;
import ml.combust.mleap.runtime.javadsl.BundleBuilder;
import ml.combust.mleap.runtime.javadsl.ContextBuilder;
import ml.combust.mleap.runtime.javadsl.LeapFrameBuilder;
import ml.combust.mleap.runtime.javadsl.LeapFrameSupport;
import ml.combust.mleap.tensor.Tensor;

/**
 * MLeap's own JVM runtime behind a line protocol on stdin/stdout, so Python can score an MLeap
 * bundle with MLeap itself. It runs in a JVM of its own: MLeap 0.16 is Scala 2.12, Spark 4's JVM
 * is Scala 2.13, and the two cannot share a classpath.
 *
 * <pre>
 * started       -> READY
 * LOAD path     -> OK nanoseconds inputSize          (a bundle zip or directory; replaces the last one)
 * SCORE n v...  -> OK k pred p1..pk pred p1..pk ...  (n rows of inputSize doubles, row after row)
 * anything bad  -> ERR one-line message
 * </pre>
 *
 * Doubles are written with Double.toString, which reads back to the same bits.
 */
public final class MleapServer {
  private static final List<String> OUTPUTS = List.of("prediction", "probability");

  private final MleapContext context = new ContextBuilder().createMleapContext();
  private final LeapFrameBuilder frames = new LeapFrameBuilder();
  private final LeapFrameSupport support = new LeapFrameSupport();
  private Transformer root;
  private StructType schema;
  private int inputSize;

  public static void main(String[] args) throws Exception {
    MleapServer server = new MleapServer();
    PrintStream out = new PrintStream(System.out, false, StandardCharsets.UTF_8);
    System.setOut(System.err); // a library printing to stdout must not break the protocol
    BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
    out.println("READY");
    out.flush();
    for (String line = in.readLine(); line != null; line = in.readLine()) {
      String answer;
      try {
        answer = server.handle(line.trim());
      } catch (Throwable e) {
        String message = e.getMessage() == null ? "" : ": " + e.getMessage();
        answer = "ERR " + (e.getClass().getSimpleName() + message).replaceAll("\\s+", " ");
      }
      out.println(answer);
      out.flush();
    }
  }

  private String handle(String line) throws Exception {
    if (line.startsWith("LOAD ")) {
      long start = System.nanoTime();
      root = new BundleBuilder().load(new File(line.substring(5)), context).root();
      inputSize = featureSize();
      schema = frames.createSchema(List.of(frames.createField("features",
          frames.createTensor(frames.createBasicDouble(), List.of(inputSize), false))));
      return "OK " + (System.nanoTime() - start) + " " + inputSize;
    }
    if (line.startsWith("SCORE ")) {
      if (root == null) {
        throw new IllegalStateException("no bundle loaded");
      }
      return score(line.substring(6).trim().split("\\s+"));
    }
    throw new IllegalArgumentException("unknown command: " + line);
  }

  /** The bundle's own input schema says how many features a row has. */
  private int featureSize() {
    DataType type = root.inputSchema().getField("features").get().dataType();
    if (!(type instanceof TensorType) || ((TensorType) type).dimensions().isEmpty()) {
      throw new IllegalStateException("the bundle's features are not a tensor of fixed size: " + type);
    }
    return (Integer) ((TensorType) type).dimensions().get().head();
  }

  @SuppressWarnings({"unchecked", "rawtypes"})
  private String score(String[] tokens) {
    int n = Integer.parseInt(tokens[0]);
    if (tokens.length != 1 + n * inputSize) {
      throw new IllegalArgumentException(
          "expected " + n + " rows of " + inputSize + " values, got " + (tokens.length - 1) + " values");
    }
    List<Row> rows = new ArrayList<>(n);
    for (int r = 0; r < n; r++) {
      double[] values = new double[inputSize];
      for (int i = 0; i < inputSize; i++) {
        values[i] = Double.parseDouble(tokens[1 + r * inputSize + i]);
      }
      Tensor tensor = Tensor.denseVector(values, (scala.reflect.ClassTag) scala.reflect.ClassTag$.MODULE$.Double());
      rows.add(frames.createRow(tensor));
    }
    DefaultLeapFrame frame = frames.createFrame(schema, rows);
    DefaultLeapFrame result = support.select(root.transform(frame).get(), OUTPUTS);
    StringBuilder answer = new StringBuilder("OK");
    boolean first = true;
    for (Row row : support.collect(result)) {
      double[] probability = (double[]) row.getTensor(1).toDense().values();
      if (first) {
        answer.append(' ').append(probability.length);
        first = false;
      }
      answer.append(' ').append(row.getDouble(0));
      for (double p : probability) {
        answer.append(' ').append(p);
      }
    }
    return answer.toString();
  }
}
