typedef int kvf__placeholder_t;
