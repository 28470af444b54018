/* placeholder: being written */
typedef int kvf__placeholder_t;
